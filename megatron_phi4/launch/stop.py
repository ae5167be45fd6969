"""Stop requests from the scheduler: caught from the first instant, reported to the batch script.

Two gaps this closes around the trainer's own handler (``training/signals.py``, installed when the
training loop starts):

* **Start-up.** Importing torch, building a 14B model and loading a checkpoint take minutes. A
  SIGUSR1/SIGTERM in that window would kill the process (default action) or, under the SLURM
  launcher that makes torchrun ignore them (``examples/slurm/torchrun_node.sh``), be lost.
  :class:`EarlyStop` is installed by the entry point before torch is imported; it records the
  signal and later hands it to the trainer's ``StopSignal``, which then stops after the first
  step (saving a checkpoint) exactly as if the signal had arrived during training.
* **Requeue.** A run that stopped on a signal exits 0, like a finished one. The batch script must
  requeue the first and not the second, so rank 0 leaves ``<run_dir>/stopped_by_signal``
  (written atomically; removed again when a run finishes or fails) -- see
  ``examples/slurm/train.sbatch``.

Pure Python, no torch: importing this module is instant.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

__all__ = ["STOP_SIGNALS", "STOP_MARKER", "EarlyStop", "marker_path", "write_stop_marker", "clear_stop_marker"]

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)
STOP_MARKER = "stopped_by_signal"


class EarlyStop:
    """Records SIGTERM/SIGUSR1 until a trainer-side stop object (anything with ``received``) exists."""

    def __init__(self):
        self.received: int | None = None
        self._target = None
        self._previous: dict = {}

    def install(self) -> "EarlyStop":
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (embedded use): nothing to do
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        if self._target is not None and getattr(self._target, "received", None) is None:
            self._target.received = signum

    def restore(self) -> None:
        """Put back the dispositions found at :meth:`install` -- after the run, so that a stop
        signal arriving while the interpreter shuts down meets them rather than CPython's reset to
        the default action (terminate). Under ``examples/slurm`` they are SIG_IGN (inherited from
        the launcher), so a SIGUSR1 re-sent by the batch script cannot turn a clean exit 0 into
        death by signal; for in-process callers (tests) their own handlers come back."""
        for sig, prev in self._previous.items():
            try:
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._previous.clear()

    def hand_over(self, target) -> None:
        """From now on signals (past and future, until ``target`` installs its own handler) go to
        ``target.received``."""
        self._target = target
        if self.received is not None and getattr(target, "received", None) is None:
            target.received = self.received


def marker_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / STOP_MARKER


def write_stop_marker(run_dir: str | os.PathLike, summary: dict) -> Path:
    """Write ``<run_dir>/stopped_by_signal`` (JSON: where it stopped, when, on which host) atomically."""
    path = marker_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    stopped = {name: s.get("steps") for name, s in summary.get("stages", {}).items() if s.get("stopped")}
    info = {"stopped_stages": stopped, "global_step": summary.get("global_step"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")}
    tmp = path.with_name(f".{STOP_MARKER}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info) + "\n")
    os.replace(tmp, path)
    return path


def clear_stop_marker(run_dir: str | os.PathLike) -> None:
    try:
        marker_path(run_dir).unlink()
    except FileNotFoundError:
        pass
