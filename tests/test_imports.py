"""Imports go one way: config -> distributed -> layers -> models -> engine -> training / post-training
-> tools. Every ``import`` statement of the package (module level and inside functions alike) is
read with ``ast``; no package may import one above it, and there is no cycle between packages.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "megatron_phi4"

# Level of each top-level package or module of megatron_phi4; a unit imports only lower or equal levels.
LEVELS = {
    "config": 0, "registry": 0, "fileio": 0, "process": 0, "tokenizer": 0, "logs": 0,
    "distributed": 1, "data": 1,
    "layers": 2,
    "models": 3, "losses": 3,
    "engine": 4, "checkpoint": 4,
    "training": 5, "generation": 5,
    "posttrain": 6,
    "demo": 7, "api": 7, "train": 7, "launch": 7, "tools": 7, "planner": 7,
}
# Pairs on the same level that must still not meet.
FORBIDDEN = {("checkpoint", "engine"), ("distributed", "data"), ("data", "distributed"), ("losses", "models")}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "megatron_phi4" and len(parts) > 1 else None


def _imports() -> dict[str, set[tuple[str, str]]]:
    """{unit: {(imported unit, where)}} for every import in the package's files."""
    edges: dict[str, set[tuple[str, str]]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        mod = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        unit = _unit(mod) if mod != "megatron_phi4" else None
        if unit is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # relative import
                    base = ".".join(mod.split(".")[: len(mod.split(".")) - node.level + (rel.name == "__init__")]
                                    + [node.module])
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                other = _unit(t)
                if other is not None and other != unit:
                    edges.setdefault(unit, set()).add((other, f"{path.relative_to(PKG.parent)}:{node.lineno}"))
    return edges


def test_every_unit_has_a_level():
    units = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units <= set(LEVELS), f"add {sorted(units - set(LEVELS))} to LEVELS in {__file__}"


def test_imports_go_one_way():
    bad = []
    for unit, deps in _imports().items():
        for other, where in deps:
            if LEVELS[other] > LEVELS[unit] or (unit, other) in FORBIDDEN:
                bad.append(f"{where}: {unit} (level {LEVELS[unit]}) imports {other} (level {LEVELS[other]})")
    assert not bad, "upward or forbidden imports:\n" + "\n".join(sorted(bad))


def test_no_cycle_between_packages():
    graph = {u: {o for o, _ in deps} for u, deps in _imports().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(v):] + [v]))
            if v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)


def test_distributed_imports_no_model_and_no_loss():
    deps = {o for o, _ in _imports().get("distributed", set())}
    assert not deps & {"models", "losses", "engine", "layers", "training", "checkpoint"}, deps
