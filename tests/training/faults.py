"""Test-only fault injection, as a trainer callback (never in the training loop itself).

Add it to a recipe: ``callbacks: [{type: "tests.training.faults:Faults", ...options}]``.

* ``exit_after_step=N`` (``rank=R`` to limit it to one rank): ``os._exit(137)`` -- like SIGKILL --
  once global step N is complete, including its checkpoint (at the next step's start).
* ``nan_steps=[LO, HI]``: poison the gradients of global steps LO..HI (before clipping).
* ``crash_in_checkpoint=STEP`` (``component="model"``): raise right after that component of the
  stage-step-STEP checkpoint was written (a crash in the middle of a checkpoint write).
* ``pause={"event": E, "global_step": K, "component": C}`` with ``marker_dir``: at event E of
  global step K (for ``checkpoint_progress``: after component C), write ``marker_dir/paused`` and
  block -- until ``marker_dir/release`` appears if ``"release": true``, else forever (the test
  sends a real signal while the process sits at exactly that point).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from megatron_phi4.training.callbacks import Callback


class Faults(Callback):
    name = "faults"

    def __init__(self, exit_after_step=None, rank=None, nan_steps=None, crash_in_checkpoint=None,
                 component="model", pause=None, marker_dir=None):
        self.exit_after_step, self.rank = exit_after_step, rank
        self.nan_steps = tuple(nan_steps) if nan_steps else None
        self.crash_in_checkpoint, self.component = crash_in_checkpoint, component
        self.pause, self.marker_dir = pause, Path(marker_dir) if marker_dir else None

    def _mine(self, trainer) -> bool:
        return self.rank is None or trainer.dims.rank == self.rank

    def _maybe_pause(self, trainer, event: str, global_step: int, component: str | None = None) -> None:
        p = self.pause
        if not p or p["event"] != event or p["global_step"] != global_step or not self._mine(trainer):
            return
        if component is not None and p.get("component", component) != component:
            return
        tmp = self.marker_dir / "paused.tmp"
        tmp.write_text(f"{event} {global_step} {component or ''}\n")
        os.replace(tmp, self.marker_dir / "paused")
        while not (p.get("release") and (self.marker_dir / "release").exists()):
            time.sleep(0.02)

    def pre_step(self, trainer) -> None:
        done = trainer.state.global_step
        if self.exit_after_step is not None and done == self.exit_after_step and self._mine(trainer):
            os._exit(137)
        self._maybe_pause(trainer, "pre_step", done + 1)

    def post_backward(self, trainer, result) -> None:
        if self.nan_steps and self.nan_steps[0] <= result.global_step <= self.nan_steps[1]:
            for p in trainer.engine.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        self._maybe_pause(trainer, "post_backward", result.global_step)

    def pre_optim_step(self, trainer, result) -> None:
        self._maybe_pause(trainer, "pre_optim_step", result.global_step)

    def post_step(self, trainer, result) -> None:
        self._maybe_pause(trainer, "post_step", result.global_step)

    def checkpoint_progress(self, trainer, tmp_dir, component) -> None:
        stage = trainer.stage
        if self.crash_in_checkpoint == stage.step and component == self.component:
            raise RuntimeError(f"injected fault: crash during checkpoint write (after {component}/)")
        self._maybe_pause(trainer, "checkpoint_progress", trainer.state.global_step, component)
