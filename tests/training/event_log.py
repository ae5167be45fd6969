"""A test callback a recipe adds by name: appends every event (rank 0) to a JSONL file, and keeps
a counter of the steps it saw as checkpointed state (restored on resume)."""
from __future__ import annotations

import json
from pathlib import Path

from megatron_phi4.training.callbacks import EVENTS, Callback


class EventLog(Callback):
    name = "event_log"

    def __init__(self, path: str):
        self.path = Path(path)
        self.steps_seen = 0

    def _write(self, trainer, event, **info):
        if trainer.dims.rank != 0:
            return
        stage = trainer.stage
        row = {"event": event, "stage": stage.name if stage else None, "step": stage.step if stage else None,
               "global_step": trainer.state.global_step, "steps_seen": self.steps_seen, **info}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def post_step(self, trainer, result):
        self.steps_seen += 1
        self._write(trainer, "post_step")

    def checkpoint_progress(self, trainer, tmp_dir, component):
        self._write(trainer, "checkpoint_progress", component=component)

    def post_checkpoint(self, trainer, path):
        self._write(trainer, "post_checkpoint", path=Path(path).name)

    def on_error(self, trainer, error):
        self._write(trainer, "on_error", error=type(error).__name__)

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = int(state["steps_seen"])


def _simple(event):
    def handler(self, trainer, *args):
        self._write(trainer, event)
    return handler


for _event in EVENTS:
    if _event not in EventLog.__dict__:
        setattr(EventLog, _event, _simple(_event))
