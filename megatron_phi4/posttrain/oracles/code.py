"""The program-tests oracle: run model-written code, then its tests, in a sandbox.

``CodeOracle(timeout_s=..., memory_mb=...).check(program, tests)`` passes when ``tests`` -- Python
source run after ``program`` in the same namespace, MBPP style (top-level ``assert`` lines) -- runs
to its end. Everything about *how* the code is contained lives in :mod:`.sandbox`; this module maps
a sandbox run to an :class:`OracleResult`, reads the program out of a markdown response, and checks
many programs at once on a bounded pool of sandboxes.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from megatron_phi4.posttrain.oracles.base import Oracle, OracleResult, broadcast_references, require_str
from megatron_phi4.posttrain.oracles.sandbox import Sandbox, SandboxLimits

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.MULTILINE | re.DOTALL)
_PYTHON_TAGS = {"", "python", "python3", "py", "py3"}


def extract_program(response: str) -> str:
    """The code in a model response: all fenced blocks tagged python/py (or untagged), joined in
    order -- a helper in one block and the solution in the next both count, and an example-usage
    block after the solution still sees its definitions. An unclosed last fence (generation hit its
    token limit) runs to the end. A response without fences is taken as code whole."""
    blocks = [body for tag, body in _FENCE.findall(response) if tag.lower() in _PYTHON_TAGS]
    return "\n".join(blocks) if blocks else response


class CodeOracle(Oracle):
    """Program + tests in a fresh sandbox per check (see :mod:`.sandbox` for the isolation).

    ``timeout_s``: wall-clock seconds for program + tests (CPU time is capped at the next whole
    second + 1, per process). ``memory_mb``: address space per process. ``max_workers``: sandboxes
    run at once by :meth:`check_many` (default: the number of CPUs this process may use).
    ``sandbox``: "auto" (strongest available), "bwrap", "unshare" or "rlimits". ``pids_cgroup``
    (root callers): None = a pids cgroup per run where the machine has one, True = insist, False =
    none (the uid's RLIMIT_NPROC is then the only process cap). ``extract_code``:
    read the program out of markdown fences first (:func:`extract_program`). Other keywords go to
    :class:`SandboxLimits` (max_processes, max_output_bytes, max_file_mb, tmpfs_mb, max_open_files,
    startup_timeout_s)."""

    name = "code"

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 512, *, max_workers: int | None = None,
                 sandbox: str = "auto", python: str | None = None, extract_code: bool = True,
                 uid_base: int | None = None, pids_cgroup: bool | None = None, **limits):
        unknown = set(limits) - set(SandboxLimits.__dataclass_fields__)
        if unknown:
            raise TypeError(f"CodeOracle: unknown option(s) {sorted(unknown)}; allowed: timeout_s, memory_mb, "
                            f"max_workers, sandbox, python, extract_code, uid_base, pids_cgroup, "
                            f"{', '.join(sorted(SandboxLimits.__dataclass_fields__))}")
        self.limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, **limits)
        if max_workers is None:
            max_workers = len(os.sched_getaffinity(0))
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"CodeOracle.max_workers: a positive integer, got {max_workers!r}")
        self.max_workers = max_workers
        self.extract_code = extract_code
        extra = {} if uid_base is None else {"uid_base": uid_base}
        self.sandbox = Sandbox(self.limits, mode=sandbox, python=python, pids_cgroup=pids_cgroup, **extra)

    @property
    def sandbox_mode(self) -> str:
        """"bwrap", "unshare" or "rlimits": what isolates the programs on this machine."""
        return self.sandbox.mode

    def check(self, program: str, tests: str) -> OracleResult:
        _compile_tests(tests)
        return self._check(program, tests)

    def _check(self, program: str, tests: str) -> OracleResult:
        program = require_str(program, "program")
        if self.extract_code:
            program = extract_program(program)
        run = self.sandbox.run(program, tests)
        return OracleResult(run.passed, run.reason, None, run.stdout, run.stderr)

    def check_many(self, candidates: Sequence[str], references: str | Sequence[str]) -> list[OracleResult]:
        """Check many programs, ``max_workers`` sandboxes at a time, results in input order.
        Threads only wait on the sandboxes' pipes, so the GIL is not the bottleneck."""
        tests = broadcast_references(candidates, references)
        for t in dict.fromkeys(tests):  # every distinct test suite compiles, before any work starts
            _compile_tests(t)
        if len(candidates) <= 1 or self.max_workers == 1:
            return [self._check(c, t) for c, t in zip(candidates, tests)]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(candidates)),
                                thread_name_prefix="code-oracle") as pool:
            return list(pool.map(self._check, candidates, tests))


def _compile_tests(tests: str) -> None:
    """Tests are the reference: if they do not compile, every rollout would fail for a reason that
    is not the model's, so that is an error in the data."""
    try:
        compile(require_str(tests, "tests"), "<tests>", "exec")
    except SyntaxError as exc:
        raise ValueError(f"code oracle: the tests do not compile: {exc.msg} (tests line {exc.lineno}: "
                         f"{(exc.text or '').strip()[:120]})") from None
