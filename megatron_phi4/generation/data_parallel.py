"""Spreading independent work items (questions, prompts) over data-parallel ranks.

Rollouts for different questions never talk to each other, so data parallelism is plain
sharding: rank ``r`` of ``w`` takes items ``r, r + w, r + 2w, ...`` (round robin, so a list sorted
by difficulty or length still spreads evenly) and the results are gathered back in the original
order. Under tensor parallelism every rank of a TP group must work on the same items: shard over
the data-parallel group (``dims.dp_rank`` / ``dims.dp``), not over the world.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.distributed as dist

__all__ = ["shard_items", "gather_items", "map_over_ranks"]


def _rank_world(rank, world_size, group) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: got {rank}, allowed: 0 <= rank < world_size ({world_size})")
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def shard_items(items: Sequence[Any], rank: int | None = None, world_size: int | None = None,
                group=None) -> list[tuple[int, Any]]:
    """This rank's ``(index, item)`` pairs, round robin. Without ``rank``/``world_size`` they come
    from ``group`` (default: the world) or, outside ``torch.distributed``, a single rank."""
    rank, world_size = _rank_world(rank, world_size, group)
    return [(i, items[i]) for i in range(rank, len(items), world_size)]


def gather_items(local: Sequence[tuple[int, Any]], num_items: int, group=None) -> list[Any]:
    """Every rank's ``(index, result)`` pairs, gathered on every rank into one list in index order
    (``all_gather_object``: results must be picklable). Checks that each index came back once."""
    parts = [list(local)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, list(local), group=group)
    out: list[Any] = [None] * num_items
    seen = [False] * num_items
    for part in parts:
        for i, result in part:
            if seen[i]:
                raise RuntimeError(f"gather_items: item {i} was returned by two ranks")
            out[i], seen[i] = result, True
    missing = [i for i, s in enumerate(seen) if not s]
    if missing:
        raise RuntimeError(f"gather_items: no rank returned items {missing[:10]}")
    return out


def map_over_ranks(fn: Callable[[Any], Any], items: Sequence[Any], group=None) -> list[Any]:
    """``[fn(x) for x in items]`` with the items spread over the ranks of ``group``; every rank
    gets the whole list back."""
    local = [(i, fn(x)) for i, x in shard_items(items, group=group)]
    return gather_items(local, len(items), group=group)
