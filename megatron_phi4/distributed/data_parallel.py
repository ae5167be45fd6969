"""Data parallelism: FSDP2 ``fully_shard`` over the DP mesh, plus the small pieces around it.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is used as is: it works on CPU with gloo in torch
2.13 (all-gather / reduce-scatter), shards parameters, gradients and -- since the optimizer is
built on the sharded DTensor parameters -- the optimizer state (ZeRO-3). What this module adds:

* the precision policy: bf16 parameters for compute and fp32 gradient reduction on GPU, fp32
  everything on CPU (``fsdp_dtypes``);
* sum semantics: the engine scales each micro-batch loss by 1 / (global units), so the DP
  reduction must *sum* (``set_gradient_divide_factor(1.0)``, in ``apply_fsdp``);
* gradient accumulation without communication: reduce-scatter only on the last micro-batch
  (``set_grad_sync``); with PP the pipeline stage does this itself;
* ``dp_shard='none'``: replicated DP, one coalesced all-reduce (SUM) of all gradients after the
  last micro-batch (``all_reduce_grads``);
* the sequence-parallel norm gradients' all-reduce over TP (``all_reduce_grads`` on those).
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


def fsdp_dtypes(mixed_precision: str, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(param_dtype, reduce_dtype) for FSDP's MixedPrecisionPolicy."""
    use_bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")
    return (torch.bfloat16 if use_bf16 else None), torch.float32


def set_grad_sync(parts: Iterable[nn.Module], enabled: bool) -> None:
    """Reduce-scatter gradients in this backward (last micro-batch) or only accumulate locally."""
    from torch.distributed.fsdp import FSDPModule

    for part in parts:
        if isinstance(part, FSDPModule):
            part.set_requires_gradient_sync(enabled)
            part.set_is_last_backward(enabled)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def all_reduce_grads(params: Iterable[nn.Parameter], group, bucket_bytes: int = 64 << 20) -> None:
    """SUM-all-reduce the (local) gradients of ``params`` over ``group`` in flat buckets."""
    if group is None or dist.get_world_size(group) == 1:
        return
    grads = [_local(p.grad) for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0

    def flush():
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        bucket.clear()

    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= bucket_bytes:
            flush()
            size = 0
    flush()


def apply_fsdp(model: nn.Module, blocks: Iterable[nn.Module], dp_mesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True) -> None:
    """FSDP2 over the DP mesh: one unit per block plus the root (embedding, norm, head).

    Parameters, gradients and (because the optimizer sees the sharded DTensors) optimizer state
    are sharded over DP. Gradients are reduce-scattered in ``reduce_dtype`` and *summed* (divide
    factor 1): the engine already scales every micro-batch loss by 1/global units.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    units = []
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        units.append(block)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    units.append(model)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        # Plain SUM collectives (a divide factor alone selects PREMUL_SUM, which gloo lacks; on NCCL
        # SUM is also the zero-copy path).
        unit.set_force_sum_reduction_for_comms(True)
    logger.info("apply_fsdp: %d FSDP units over %d DP ranks (param %s, reduce %s)", len(units),
                dp_mesh.size(), param_dtype or "fp32", reduce_dtype)


def apply_compile(blocks: Iterable[nn.Module]) -> int:
    """``torch.compile`` each block in place (keeps the module names; ``torch.compile(m)`` would add
    ``_orig_mod``). Returns how many blocks were compiled."""
    n = 0
    for block in blocks:
        block.compile()
        n += 1
    logger.info("apply_compile: compiled %d blocks", n)
    return n
