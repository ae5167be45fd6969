"""Test-only trainer callbacks that hold workers at a known step, for the multi-node tests.

Added to a recipe as ``callbacks: [{type: "tests.ops.holds:HoldUntilStopSignal", ...}]``; they
change no numerics (they only wait), so a held run's losses still equal an unheld one's.

* :class:`HoldUntilStopSignal` -- after global step N, every rank writes
  ``marker_dir/held.N.<rank>`` and waits until *its own* stop flag (the ``stop_signal``
  callback's) is set. A run therefore stops at step N at the latest, and only if the signal really
  reached every worker on every node: a worker the signal missed waits until its hang guard
  raises, and the test fails. ``steps`` maps SLURM's restart count (``SLURM_RESTART_COUNT``, 0
  for the first run of a job) to N, so each run of a requeued job holds at its own step.
* :class:`AbortOnExit` -- after the run, one rank of one run of a requeued job (``restart``,
  ``rank``) dies with SIGABRT in its ``atexit`` handlers, as a worker once did at interpreter exit
  on the CI: the stop's checkpoint and marker are done, so the batch script must requeue anyway.
* :class:`PauseNode` -- before global step N, the workers of one "node" (the ``PHI4_TEST_NODE``
  value its launcher was started with) write ``marker_dir/paused.<rank>`` and sleep until they
  are killed; the other node's workers go on into step N and block in its first collective with
  them, as on a machine that died mid-step.
"""
from __future__ import annotations

import atexit
import os
import time
from pathlib import Path

from megatron_phi4.training.callbacks import Callback


def _mark(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class HoldUntilStopSignal(Callback):
    name = "hold_until_stop_signal"

    def __init__(self, steps: dict, marker_dir, hang_guard_s: float = 600.0):
        self.step = {int(k): int(v) for k, v in steps.items()}.get(int(os.environ.get("SLURM_RESTART_COUNT", 0)))
        self.marker_dir = Path(marker_dir)
        self.hang_guard_s = hang_guard_s

    def post_step(self, trainer, result) -> None:
        if result.global_step != self.step:
            return
        flag = trainer.callbacks.get("stop_signal").signal
        _mark(self.marker_dir / f"held.{result.global_step}.{trainer.dims.rank}", f"{os.getpid()}\n")
        deadline = time.monotonic() + self.hang_guard_s
        while flag.received is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {trainer.dims.rank}: no stop signal arrived within {self.hang_guard_s}s "
                                   f"of global step {result.global_step}")
            time.sleep(0.05)


class AbortOnExit(Callback):
    name = "abort_on_exit"

    def __init__(self, restart: int, rank: int):
        self.restart, self.rank = int(restart), int(rank)

    def post_run(self, trainer) -> None:
        if int(os.environ.get("SLURM_RESTART_COUNT", 0)) == self.restart and trainer.dims.rank == self.rank:
            atexit.register(os.abort)


class PauseNode(Callback):
    name = "pause_node"

    def __init__(self, node, global_step, marker_dir):
        self.node, self.global_step, self.marker_dir = str(node), int(global_step), Path(marker_dir)

    def pre_step(self, trainer) -> None:
        if os.environ.get("PHI4_TEST_NODE") != self.node or trainer.state.global_step + 1 != self.global_step:
            return
        _mark(self.marker_dir / f"paused.{trainer.dims.rank}", f"{os.getpid()}\n")
        while True:  # until the test kills this node
            time.sleep(1)
