"""Trainer callbacks: everything around the training step plugs in here, not into the loop.

The stage loop (``Trainer._run_stage``) only steps and dispatches events, in this order::

    pre_run
      pre_stage                                  (weights, optimizer, data of the stage are ready)
        pre_step -> [data, forward/backward] -> post_backward -> [clip] -> pre_optim_step
          -> [optimizer + schedule step unless result.skip_update] -> post_step
        post_eval                                (when an evaluation ran)
        pre_checkpoint -> checkpoint_progress (per component) -> post_checkpoint
      post_stage                                 (the stage is complete; its final checkpoint follows)
    post_run                                     (always, also after an error)
    on_error                                     (an exception is leaving the run)

Every rank runs every callback (a callback may use collectives; it must call them on all ranks
in the same order). Built-in callbacks (``builtin.py``): the non-finite-step policy, metrics,
evaluation, stop-signal handling and checkpointing; a recipe lists, reorders, configures or turns
them off, and adds its own (``callbacks:`` in the recipe; see ``build_callbacks``). A callback with
state that must survive a restart implements ``state_dict``/``load_state_dict`` (saved in the
checkpoint's trainer.json under its name).
"""
from __future__ import annotations

import importlib
from typing import Any

EVENTS = ("pre_run", "pre_stage", "pre_step", "post_backward", "pre_optim_step", "post_step", "post_eval",
          "pre_checkpoint", "checkpoint_progress", "post_checkpoint", "post_stage", "post_run", "on_error")


class Callback:
    """Base class: override the events you need. ``trainer`` exposes ``recipe``, ``dims``,
    ``engine``, ``stage`` (the running stage: config, step, optimizer, data, ...), ``state``
    (run-wide counters), ``request_stop(reason, save=True)`` and ``log(msg)``."""

    name: str = "callback"

    def pre_run(self, trainer) -> None: ...

    def pre_stage(self, trainer) -> None: ...

    def pre_step(self, trainer) -> None: ...

    def post_backward(self, trainer, result) -> None: ...

    def pre_optim_step(self, trainer, result) -> None: ...

    def post_step(self, trainer, result) -> None: ...

    def post_eval(self, trainer, metrics: dict) -> None: ...

    def pre_checkpoint(self, trainer, stage: str, step: int) -> None: ...

    def checkpoint_progress(self, trainer, tmp_dir, component: str) -> None: ...

    def post_checkpoint(self, trainer, path) -> None: ...

    def post_stage(self, trainer) -> None: ...

    def post_run(self, trainer) -> None: ...

    def on_error(self, trainer, error: BaseException) -> None: ...

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None: ...


class CallbackList:
    """Dispatches each event to the callbacks in order."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)
        names = [c.name for c in self.callbacks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"callbacks: names must be unique (they key checkpointed state), got {sorted(dup)} twice")

    def __iter__(self):
        return iter(self.callbacks)

    def get(self, name: str) -> Callback | None:
        return next((c for c in self.callbacks if c.name == name), None)

    def dispatch(self, event: str, trainer, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(trainer, *args)

    def __getattr__(self, event: str):
        if event not in EVENTS:
            raise AttributeError(event)
        return lambda trainer, *args: self.dispatch(event, trainer, *args)

    def state_dict(self) -> dict:
        return {c.name: s for c in self.callbacks if (s := c.state_dict()) is not None}

    def load_state_dict(self, state: dict) -> None:
        for c in self.callbacks:
            if c.name in state:
                c.load_state_dict(state[c.name])


def resolve_callback_class(type_name: str):
    """A registered callback name (``megatron_phi4.registry.CALLBACKS``) or ``"module:Class"``."""
    from megatron_phi4.registry import CALLBACKS

    if type_name in CALLBACKS:
        return CALLBACKS.get(type_name)
    if ":" in type_name:
        module, _, attr = type_name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"callbacks.type: cannot import {type_name!r}: {e}") from None
    CALLBACKS.check(type_name, "callbacks.type")


def build_callback(type_name: str, options: dict[str, Any]) -> Callback:
    cls = resolve_callback_class(type_name)
    try:
        cb = cls(**options)
    except TypeError as e:
        raise ValueError(f"callbacks.{type_name}: bad options {sorted(options)}: {e}") from None
    if not getattr(cb, "name", None) or cb.name == "callback":
        cb.name = type_name
    return cb
