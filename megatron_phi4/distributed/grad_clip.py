"""Global gradient-norm clipping across TP, PP and DP.

The true norm is the norm of the gradient of the *unsharded* model, so every element of every
parameter must be counted exactly once:

* TP-sharded weights (q/k/v/o, gate/up/down, embedding, head): each rank holds a distinct slice ->
  count them on every TP rank.
* TP-replicated parameters (RMSNorm weights): every TP rank holds the same full tensor (with its
  gradient already identical -- or made identical by the sequence-parallel all-reduce) -> count
  them on TP rank 0 only. Counting them on all ranks would inflate their share by ``tp``.
* FSDP shards (DP): distinct slices -> count on every DP rank. With ``dp_shard='none'`` the
  replicas are identical -> count on DP rank 0 only.
* Pipeline stages own disjoint layers -> count everywhere.

One all-reduce (SUM) of a single scalar over the whole world gives sum of squares; clipping then
scales the local gradients by ``min(1, max_norm / (norm + 1e-6))`` exactly like
``torch.nn.utils.clip_grad_norm_``.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def global_grad_norm(params_and_counted: Iterable[tuple[torch.nn.Parameter, bool]], group=None,
                     device: torch.device | None = None) -> torch.Tensor:
    """sqrt(sum over counted params of ||grad||^2), all-reduced over ``group`` (default: world)."""
    total = None
    for p, counted in params_and_counted:
        if not counted or p.grad is None:
            continue
        g = _local(p.grad).detach().float()
        sq = g.pow(2).sum()
        total = sq if total is None else total + sq
    if total is None:
        total = torch.zeros((), device=device or torch.device("cpu"))
    total = total.to(torch.float64) if total.device.type == "cpu" else total
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return total.sqrt()


@torch.no_grad()
def clip_grads_(params: Iterable[torch.nn.Parameter], total_norm: float, max_norm: float) -> None:
    if max_norm <= 0 or not math.isfinite(total_norm):
        return
    coef = min(1.0, max_norm / (total_norm + 1e-6))
    if coef >= 1.0:
        return
    for p in params:
        if p.grad is not None:
            _local(p.grad).mul_(coef)
