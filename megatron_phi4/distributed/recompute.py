"""Activation recompute (checkpointing) with ``torch.utils.checkpoint`` (non-reentrant).

* ``full``: each decoder block keeps only its input; everything inside is recomputed in backward
  (TP/SP collectives inside the block run again, in the same order on every TP rank).
* ``selective``: only ``Attention.core_attention`` (softmax(q k^T / sqrt(d)) v) is recomputed --
  its activations grow with seq^2 per head (without a fused kernel) while its FLOPs are small
  next to the projections (Korthikanti et al., 2022).

The wrappers replace the bound method on the instance, so module names and checkpoint keys are
unchanged (``checkpoint_wrapper`` would add a ``_checkpoint_wrapped_module`` prefix).
"""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

RECOMPUTE_MODES = ("none", "selective", "full")


def _run_checkpointed(fn, *args, **kwargs):
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def checkpoint_method(obj, name: str) -> None:
    """Make ``obj.<name>(...)`` run under activation checkpointing."""
    original = getattr(obj, name)
    if isinstance(original, functools.partial) and original.func is _run_checkpointed:
        return  # already wrapped
    setattr(obj, name, functools.partial(_run_checkpointed, original))


def apply_recompute(blocks: list[nn.Module], mode: str) -> int:
    """Apply ``mode`` to decoder blocks; returns how many were wrapped."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"parallel.recompute: unknown mode {mode!r}, allowed: {', '.join(RECOMPUTE_MODES)}")
    if mode == "none":
        return 0
    for block in blocks:
        if mode == "full":
            checkpoint_method(block, "forward")
        else:
            checkpoint_method(block.attention, "core_attention")
    return len(blocks)
