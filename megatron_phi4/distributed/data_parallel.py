"""Data parallelism: FSDP2 ``fully_shard`` over the DP mesh, plus the small pieces around it.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is used as is: it works on CPU with gloo in torch
2.13 (all-gather / reduce-scatter), shards parameters, gradients and -- since the optimizer is
built on the sharded DTensor parameters -- the optimizer state (ZeRO-3). What this module adds:

* the precision policy: bf16 parameters for compute and fp32 gradient reduction (``apply_fsdp``'s
  dtypes come from ``mixed_precision.precision_plan``; without FSDP bf16 is autocast);
* sum semantics: the engine scales each micro-batch loss by 1 / (global units), so the DP
  reduction must *sum* (``set_gradient_divide_factor(1.0)``, in ``apply_fsdp``);
* gradient accumulation without communication: reduce-scatter only on the last micro-batch
  (``set_grad_sync``); with PP the pipeline stage does this itself;
* ``dp_shard='none'``: replicated DP. Gradients are SUM-all-reduced in fp32 buckets *during* the
  last micro-batch's backward (``OverlappedGradReducer``: each bucket is launched asynchronously
  as soon as all its gradients are final, and waited for before the optimizer step), or -- under
  pipeline parallelism, or with ``overlap_grad_reduce`` off -- in one bucketed pass after the last
  micro-batch (``all_reduce_grads``);
* the sequence-parallel norm gradients' all-reduce over TP (``all_reduce_grads`` on those);
* ``apply_compile``: ``torch.compile`` per block, which must sit between recompute and FSDP.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


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


class OverlappedGradReducer:
    """SUM-all-reduce of replicated-DP gradients, overlapped with the backward pass that finishes them.

    Why not ``DistributedDataParallel``: DDP wraps the model (every parameter name gains a
    ``module.`` prefix, which the checkpoint names and the layer layouts would have to strip) and it
    *averages* where the engine needs a *sum* (each micro-batch loss is already divided by the
    global units); the composable ``replicate`` is private API. The mechanism is DDP's:

    * parameters go into buckets of about ``bucket_bytes`` in *reverse registration order*, which
      is roughly the order backward finishes them (the LM head first, the embedding last);
    * a ``register_post_accumulate_grad_hook`` on every parameter marks it ready once autograd has
      accumulated this backward's gradient into ``.grad``; when a bucket is complete, it is copied
      into one flat ``reduce_dtype`` (fp32) buffer and ``all_reduce(async_op=True)`` is launched --
      strictly in bucket order, so every rank issues the same collectives in the same order even if
      its backward finishes buckets in another order (a later bucket that completes first waits
      for the earlier ones);
    * at most ``max_in_flight`` buckets are outstanding: launching one more first waits for the
      oldest and copies its sums back into ``.grad`` (bounds the extra memory to a few buckets; on
      CUDA the wait only orders streams and does not block the host);
    * ``finish()`` launches whatever is left (parameters that got no gradient contribute zeros, so
      the buffers have the same size on every rank; a ``None`` gradient stays ``None``), waits, and
      copies the sums back. Call it after backward and before clipping / the optimizer step.

    Only the backward that follows ``arm()`` reduces (the engine arms it for the last micro-batch:
    earlier ones accumulate locally, as with FSDP's ``set_requires_gradient_sync``).
    """

    def __init__(self, params: Iterable[nn.Parameter], group, *, bucket_bytes: int = 64 << 20,
                 reduce_dtype: torch.dtype = torch.float32, max_in_flight: int = 2):
        self.group, self.reduce_dtype = group, reduce_dtype
        self.max_in_flight = max(1, max_in_flight)
        ordered = [p for p in params if p.requires_grad][::-1]
        self.buckets: list[list[nn.Parameter]] = []
        size = 0
        for p in ordered:
            if not self.buckets or size >= bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * torch.empty((), dtype=reduce_dtype).element_size()
        self._bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in ordered]
        self._armed = False
        self._ready: list[set[int]] = []
        self._next = 0
        self._in_flight: list[tuple[int, torch.Tensor, object]] = []
        self.launch_log: list[int] = []  # bucket indices in launch order (tests, debugging)

    def arm(self) -> None:
        """Reduce the gradients the next backward finishes."""
        self._armed = True
        self._ready = [set() for _ in self.buckets]
        self._next = 0
        self._in_flight = []
        self.launch_log = []

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self._armed:
            return
        b = self._bucket_of[id(param)]
        self._ready[b].add(id(param))
        while self._next < len(self.buckets) and len(self._ready[self._next]) == len(self.buckets[self._next]):
            self._launch(self._next)
            self._next += 1

    @torch.no_grad()
    def _launch(self, b: int) -> None:
        if len(self._in_flight) >= self.max_in_flight:
            self._complete(self._in_flight.pop(0))
        parts = [(_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p), dtype=self.reduce_dtype))
                 .reshape(-1).to(self.reduce_dtype) for p in self.buckets[b]]
        flat = torch.cat(parts)
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._in_flight.append((b, flat, work))
        self.launch_log.append(b)

    @torch.no_grad()
    def _complete(self, entry) -> None:
        b, flat, work = entry
        work.wait()
        offset = 0
        for p in self.buckets[b]:
            n = _local(p).numel()
            if p.grad is not None:
                g = _local(p.grad)
                g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def finish(self) -> None:
        """Launch the buckets not launched yet, wait for all, write the sums into ``.grad``."""
        if not self._armed:
            return
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1
        while self._in_flight:
            self._complete(self._in_flight.pop(0))
        self._armed = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


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


def apply_compile(blocks: Iterable[nn.Module], backend: str = "inductor") -> int:
    """``torch.compile`` each block in place with ``nn.Module.compile`` (keeps the module names and
    so the checkpoint keys; ``torch.compile(m)`` would return a wrapper whose parameters gain an
    ``_orig_mod.`` prefix). One block's code is compiled once and reused by the others of the same
    shape. Call it after recompute (the checkpointed forward is traced as one region) and before
    FSDP (FSDP2's hooks then stay outside the compiled graphs: dynamo skips them by default).
    Returns how many blocks were compiled."""
    n = 0
    for block in blocks:
        block.compile(backend=backend)
        n += 1
    logger.info("apply_compile: compiled %d blocks (backend %s)", n, backend)
    return n
