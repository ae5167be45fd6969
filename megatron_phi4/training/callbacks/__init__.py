"""Trainer callbacks (see ``base.py`` for the events and ``builtin.py`` for what every run has)."""
from __future__ import annotations

from megatron_phi4.training.callbacks.base import EVENTS, Callback, CallbackList, build_callback
from megatron_phi4.training.callbacks.builtin import DEFAULT_CALLBACKS

__all__ = ["EVENTS", "Callback", "CallbackList", "build_callback", "build_run_callbacks", "build_stage_callbacks",
           "DEFAULT_CALLBACKS"]


def build_run_callbacks(recipe) -> list[Callback]:
    """The recipe's callbacks in its order; built-ins it does not list follow in their default
    order; entries with ``enabled: false`` are dropped (that is how a built-in is turned off)."""
    listed = {c.type for c in recipe.callbacks}
    entries = list(recipe.callbacks) + [_default(n) for n in DEFAULT_CALLBACKS if n not in listed]
    return [build_callback(c.type, c.options) for c in entries if c.enabled]


def build_stage_callbacks(stage) -> list[Callback]:
    """A stage's own callbacks (active while it runs, e.g. work between two stages in post_stage)."""
    return [build_callback(c.type, c.options) for c in stage.callbacks if c.enabled]


def _default(name: str):
    from megatron_phi4.config import CallbackConfig

    return CallbackConfig(type=name)
