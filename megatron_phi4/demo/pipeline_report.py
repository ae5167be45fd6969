"""The demo's final table: one row per step -- validation loss, held-out accuracy (greedy and
sampled, with 95% Wilson intervals) after SFT and after each DPO round, wall time -- as Markdown
(``results.md``) and JSON (``results.json``), both written atomically.

Accuracy comes from the post-training report (:func:`megatron_phi4.demo.posttrain_rounds.run_posttraining`:
one row per model, ``sft``, ``dpo1``, ``dpo2``, each with ``.checkpoint``, ``.greedy`` and ``.sampled``
:class:`~megatron_phi4.demo.evaluate.Accuracy`); :func:`report_to_json` turns it into plain data
(kept in ``state.json``, so a re-run shows the table without evaluating again).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

__all__ = ["StageResult", "DemoResults", "write_results", "report_to_json", "POSTTRAIN_MODELS"]

POSTTRAIN_MODELS = ("sft", "dpo1", "dpo2")
_WHAT = {"dpo1": "token-level DPO on Pivotal Token Search pairs", "dpo2": "judge-guided DPO"}
# Optional fields a post-training row may carry (shown when present).
_ROW_EXTRAS = ("val_loss", "wall_s", "steps", "pairs", "layout")


@dataclass
class StageResult:
    name: str
    what: str
    layout: str
    steps: Optional[int]
    val_loss: Optional[float]
    wall_s: Optional[float]
    reused: bool = False
    detail: str = ""
    greedy: Optional[dict] = None   # Accuracy fields: correct, total, rate, low, high
    sampled: Optional[dict] = None


@dataclass
class DemoResults:
    settings: dict
    work_dir: str
    stages: List[StageResult] = field(default_factory=list)
    posttrain_wall_s: Optional[float] = None
    posttrain_markdown: str = ""
    total_wall_s: float = 0.0
    this_run_wall_s: float = 0.0

    def row(self, name: str) -> Optional[StageResult]:
        return next((r for r in self.stages if r.name == name), None)

    def add_posttrain(self, rep: dict, wall_s: float, reused: bool) -> None:
        """Attach the post-training report: accuracy to the ``sft`` row, one row per DPO round."""
        self.posttrain_wall_s = wall_s
        self.posttrain_markdown = rep.get("markdown", "")
        for row in rep["rows"]:
            name = row["name"]
            target = self.row(name) if name == "sft" else None
            if target is None:
                target = StageResult(name=name, what=_WHAT.get(name, name), layout=row.get("layout") or "1 process",
                                     steps=row.get("steps"), val_loss=row.get("val_loss"), wall_s=row.get("wall_s"),
                                     reused=reused, detail=row.get("checkpoint") or "")
                self.stages.append(target)
            target.greedy, target.sampled = row.get("greedy"), row.get("sampled")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def to_markdown(self) -> str:
        def acc(a):
            if not a:
                return "—"
            return f"{100 * a['rate']:.1f}% [{100 * a['low']:.1f}, {100 * a['high']:.1f}]"

        def num(v, fmt):
            return "—" if v is None else fmt.format(v)

        n_eval = next((r.greedy["total"] for r in self.stages if r.greedy), None)
        lines = ["| stage | what | layout | steps | val loss | held-out acc., greedy (95% CI) "
                 "| held-out acc., sampled T=0.7 (95% CI) | wall |",
                 "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in self.stages:
            lines.append(f"| {r.name} | {r.what} | {r.layout} | {num(r.steps, '{}')} | {num(r.val_loss, '{:.4f}')} "
                         f"| {acc(r.greedy)} | {acc(r.sampled)} | {num(r.wall_s, '{:.0f} s')} |")
        if self.posttrain_wall_s is not None:
            per_row = sum((r.wall_s or 0.0) for r in self.stages if r.name in POSTTRAIN_MODELS[1:])
            rest = self.posttrain_wall_s - per_row
            lines.append(f"| post-training, rest | PTS, preference data, evaluations | | | | | | {rest:.0f} s |")
        lines.append(f"| **total** | | | | | | | **{self.total_wall_s:.0f} s** |")
        notes = []
        if n_eval:
            notes.append(f"Accuracy: fraction of {n_eval} held-out test problems (never seen in any stage) whose "
                         "last \\boxed{} holds the right integer; 95% Wilson score intervals.")
        reused = [r.name for r in self.stages if r.reused]
        if reused:
            notes.append(f"Reused from an earlier run in this work directory: {', '.join(reused)} "
                         f"(wall times are those of the run that produced them; this run took "
                         f"{self.this_run_wall_s:.0f} s).")
        s = self.settings
        notes.append(f"Settings: preset {s.get('preset')}, layout tp{s.get('tp')} pp{s.get('pp')} dp{s.get('dp')}, "
                     f"seed {s.get('seed')}.")
        return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def write_results(results: DemoResults, work_dir) -> None:
    from megatron_phi4.checkpoint.format import atomic_write_text

    work = Path(work_dir)
    atomic_write_text(work / "results.md", "# phi4-demo results\n\n" + results.to_markdown()
                      + ("\n## Post-training report\n\n" + results.posttrain_markdown if results.posttrain_markdown else ""))
    atomic_write_text(work / "results.json", json.dumps(results.to_json(), indent=1) + "\n")


def _accuracy(a) -> Optional[dict]:
    if a is None:
        return None
    return {k: (float(getattr(a, k)) if k in ("rate", "low", "high") else int(getattr(a, k)))
            for k in ("correct", "total", "rate", "low", "high")}


def report_to_json(report) -> dict:
    """A post-training report (``.rows`` with a model name, ``.checkpoint``, ``.greedy``,
    ``.sampled``; ``.to_markdown()``) as plain data. A row without a name, or a report without the
    three models, is an error: the table would silently miss them."""
    rows = []
    for i, row in enumerate(report.rows):
        name = next((getattr(row, k) for k in ("name", "model", "stage") if isinstance(getattr(row, k, None), str)),
                    None)
        if name is None:
            raise ValueError(f"post-training report row {i}: no model name (.name / .model / .stage)")
        out = {"name": name, "checkpoint": str(getattr(row, "checkpoint", "") or ""),
               "greedy": _accuracy(getattr(row, "greedy", None)), "sampled": _accuracy(getattr(row, "sampled", None))}
        for k in _ROW_EXTRAS:
            v = getattr(row, k, None)
            if v is not None:
                out[k] = v
        rows.append(out)
    missing = [m for m in POSTTRAIN_MODELS if m not in [r["name"] for r in rows]]
    if missing:
        raise ValueError(f"post-training report: no row for {', '.join(missing)} (rows: {[r['name'] for r in rows]})")
    return {"rows": rows, "markdown": report.to_markdown() if hasattr(report, "to_markdown") else ""}
