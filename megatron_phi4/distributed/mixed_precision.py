"""Mixed precision: bf16 compute, fp32 master weights, fp32 gradient reduction -- one rule, two mechanisms.

``parallel.mixed_precision``: ``bf16``, ``fp32``, or ``auto`` (bf16 on CUDA, fp32 on CPU). In bf16
the optimizer always updates fp32 parameters (the master weights, which checkpoints store), the
matrix multiplies and attention run in bf16, RMSNorm and the loss compute in fp32, and gradients are
reduced over DP in fp32. How the bf16 copies come about depends on ``parallel.dp_shard``:

* ``fsdp`` (any DP size, 1 included): FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)``. The sharded fp32 parameters are the master weights; each unit's
  all-gather produces bf16 parameters, so everything inside a block -- the residual stream too --
  is bf16; gradients are reduce-scattered in fp32 into fp32 shards. FSDP does the cast as part of
  the all-gather it runs anyway, once per unit and step.
* ``none`` (replicated DP, and the single-process engine without FSDP): ``torch.autocast`` around
  every model part's forward (``apply_autocast``). Parameters stay fp32 and are cast to bf16 per
  matrix multiply; the residual stream stays fp32 (the embedding output is fp32, and fp32 + bf16 is
  fp32), as with Megatron's ``fp32_residual_connection``; gradients of fp32 leaves are fp32, so the
  replicated all-reduce is fp32 without a cast. torchtitan makes the same split (autocast when FSDP
  is off). Not FSDP on a one-rank mesh per replica: that would turn the parameters into DTensors,
  which is what ``dp_shard: none`` exists to avoid (the zero-bubble schedule's weight pass).

The loss runs outside the autocast region on the bf16 logits and upcasts them itself.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

MIXED_PRECISION_MODES = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class PrecisionPlan:
    """What a mixed-precision setting means for one engine.

    ``fsdp_param_dtype``: FSDP2's ``param_dtype`` (None: keep fp32); ``autocast_dtype``: the dtype of
    the autocast region around each model part (None: no autocast); ``hidden_dtype`` /
    ``logits_dtype``: the dtypes of the activations pipeline stages exchange and of the logits.
    """

    fsdp_param_dtype: torch.dtype | None
    reduce_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    hidden_dtype: torch.dtype
    logits_dtype: torch.dtype

    @property
    def bf16(self) -> bool:
        return self.fsdp_param_dtype is not None or self.autocast_dtype is not None


def uses_bf16(mixed_precision: str, device: torch.device | str) -> bool:
    if mixed_precision not in MIXED_PRECISION_MODES:
        raise ValueError(f"parallel.mixed_precision: got {mixed_precision!r}, allowed: "
                         f"{', '.join(map(repr, MIXED_PRECISION_MODES))}")
    return mixed_precision == "bf16" or (mixed_precision == "auto" and torch.device(device).type == "cuda")


def precision_plan(mixed_precision: str, device: torch.device | str, use_fsdp: bool) -> PrecisionPlan:
    """The plan for ``parallel.mixed_precision`` on ``device`` with or without FSDP (module docstring)."""
    fp32, bf16 = torch.float32, torch.bfloat16
    if not uses_bf16(mixed_precision, device):
        return PrecisionPlan(None, fp32, None, fp32, fp32)
    if use_fsdp:
        return PrecisionPlan(bf16, fp32, None, bf16, bf16)
    return PrecisionPlan(None, fp32, bf16, fp32, bf16)


def _autocast_forward(forward, device_type: str, dtype: torch.dtype, *args, **kwargs):
    with torch.autocast(device_type=device_type, dtype=dtype):
        return forward(*args, **kwargs)


def apply_autocast(module: nn.Module, dtype: torch.dtype, device_type: str) -> None:
    """Run ``module``'s forward under ``torch.autocast(device_type, dtype)``, whoever calls it (the
    engine's micro-batch loop or a pipeline schedule); backward runs outside the region, as autocast
    wants. The bound ``forward`` is replaced on the instance, so module names do not change."""
    original = module.forward
    if isinstance(original, functools.partial) and original.func is _autocast_forward:
        return  # already applied
    module.forward = functools.partial(_autocast_forward, original, device_type, dtype)
