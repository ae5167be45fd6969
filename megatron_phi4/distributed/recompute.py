"""Activation recompute (checkpointing) with ``torch.utils.checkpoint`` (non-reentrant).

* ``full``: each block keeps only its input; everything inside is recomputed in backward (TP/SP
  collectives inside the block run again, in the same order on every TP rank).
* ``selective``: only the pieces the model spec names (for Phi-4 the core attention,
  softmax(q k^T / sqrt(d)) v) are recomputed -- their activations grow with seq^2 per head
  (without a fused kernel) while their FLOPs are small next to the projections (Korthikanti et
  al., 2022).

The wrappers replace the bound ``forward`` on the instance, so module names and checkpoint keys
are unchanged (``checkpoint_wrapper`` would add a ``_checkpoint_wrapped_module`` prefix).
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Iterable

from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

RECOMPUTE_MODES = ("none", "selective", "full")


def _run_checkpointed(fn, *args, **kwargs):
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def checkpoint_method(obj, name: str) -> None:
    """Make ``obj.<name>(...)`` run under activation checkpointing."""
    original = getattr(obj, name)
    if isinstance(original, functools.partial) and original.func is _run_checkpointed:
        return  # already wrapped
    setattr(obj, name, functools.partial(_run_checkpointed, original))


def apply_recompute(blocks: Iterable[nn.Module], mode: str,
                    selective_targets: Callable[[nn.Module], Iterable[nn.Module]] | None = None) -> int:
    """Apply ``mode`` to the model's blocks; ``selective_targets(block)`` names the modules whose
    forward selective recompute re-runs. Returns how many blocks were wrapped."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"parallel.recompute: unknown mode {mode!r}, allowed: {', '.join(RECOMPUTE_MODES)}")
    if mode == "none":
        return 0
    if mode == "selective" and selective_targets is None:
        raise ValueError("selective recompute needs the model spec's selective_recompute targets")
    count = 0
    for block in blocks:
        targets = [block] if mode == "full" else list(selective_targets(block))
        for module in targets:
            # Patch the module's __call__ path: torch calls forward through _call_impl, which reads
            # the instance attribute first.
            checkpoint_method(module, "forward")
        count += 1
    if count:
        logger.info("apply_recompute: %s recompute on %d blocks", mode, count)
    return count
