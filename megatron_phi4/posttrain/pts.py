"""Pivotal Token Search (Phi-4 technical report, section 4.3): the tokens of a solution at which the
probability that the model goes on to succeed jumps.

The report's procedure, for a query Q, a sampled solution T_full and a threshold p_gap::

    SUBDIVIDE(T_prefix, T):
        if |T| <= 1 or |p(success | T_prefix) - p(success | T_prefix + T)| < p_gap:
            return [T]
        T_left, T_right = Split(T)
        return SUBDIVIDE(T_prefix, T_left) + SUBDIVIDE(T_prefix + T_left, T_right)
    for T in SUBDIVIDE(empty, T_full):          # T_prefix: everything before T
        if |T| == 1 and |p(T_prefix) - p(T_prefix + T)| >= p_gap:
            yield (Q, T_prefix, T)

Every p(success | prefix) is an expensive estimate (rollouts checked by an oracle), so it is
memoized per prefix: a split then costs exactly one new estimate (the right half's two ends are
already known), and the search costs ``2 + (number of splits)`` estimates instead of the
``len(T_full) + 1`` of a token-by-token scan.

**Split** (the report: "at the cumulative midpoint of the segment's token log-probabilities"), made
precise here: for a segment ``[a, b)`` with log-probabilities ``l_a .. l_{b-1}`` and total ``S``,
the left half ends with the first token at which the running sum ``l_a + ... + l_m`` reaches half
of the total (``<= S / 2``), i.e. the shortest left half whose probability is at most the square
root of the segment's. If that token is the segment's last, the split moves one token left so both
halves are non-empty. A segment whose log-probabilities are all zero has no midpoint to weigh and
is split at its token midpoint. Low-probability tokens, where pivots tend to be, thus end up near
split points and are isolated in few steps.

What the paper does not fix and this module leaves to the caller: how p is estimated (rollout
count, sampling temperature) and p_gap (the report's illustration uses 0.2). A known property of
the procedure, kept as published: jumps inside one segment that cancel (p rising then falling by
about as much) leave ``|delta p| < p_gap`` across it, and that segment is not searched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["PivotalToken", "find_pivotal_tokens", "split_point", "PTSError"]


class PTSError(ValueError):
    """Invalid input to the search; the message names the argument."""


@dataclass(frozen=True)
class PivotalToken:
    """A token whose addition moves p(success) by at least p_gap.

    position: its index in ``solution_ids`` (its prefix is ``solution_ids[:position]``);
    p_before / p_after: p(success) after ``query + solution_ids[:position]`` and after
    ``query + solution_ids[:position + 1]``.
    """

    position: int
    token_id: int
    p_before: float
    p_after: float

    @property
    def delta(self) -> float:
        return self.p_after - self.p_before


def split_point(logprobs: Sequence[float], start: int, end: int) -> int:
    """Where the segment ``[start, end)`` (at least two tokens) is split: the left half is
    ``[start, m)``, the right ``[m, end)``, ``start < m < end`` (rule in the module docstring)."""
    if end - start < 2:
        raise PTSError(f"split_point: segment [{start}, {end}) has fewer than two tokens")
    total = sum(logprobs[start:end])
    if total == 0.0:
        return start + (end - start) // 2
    running = 0.0
    for i in range(start, end):
        running += logprobs[i]
        if running <= total / 2:
            return min(i + 1, end - 1)
    return end - 1  # unreachable: the running sum ends at the total, which is <= total / 2


def _check_inputs(query_ids, solution_ids, solution_logprobs, p_gap) -> list[float]:
    for name, ids in (("query_ids", query_ids), ("solution_ids", solution_ids)):
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise PTSError(f"{name}: expected a list of token ids, got {type(ids).__name__}")
    if len(solution_logprobs) != len(solution_ids):
        raise PTSError(f"solution_logprobs: {len(solution_logprobs)} values for {len(solution_ids)} "
                       f"solution tokens (one log-probability per token)")
    if isinstance(p_gap, bool) or not isinstance(p_gap, (int, float)) or not 0 < p_gap <= 1:
        raise PTSError(f"p_gap: got {p_gap!r}, allowed: a number in (0, 1]")
    out = []
    for i, lp in enumerate(solution_logprobs):
        lp = float(lp)
        if math.isnan(lp) or lp > 1e-4:
            raise PTSError(f"solution_logprobs[{i}]: got {lp}, allowed: a log-probability (<= 0)")
        out.append(min(lp, 0.0))
    return out


def find_pivotal_tokens(query_ids: Sequence[int], solution_ids: Sequence[int],
                        solution_logprobs: Sequence[float], p_success: Callable[[list[int]], float], *,
                        p_gap: float) -> list[PivotalToken]:
    """The pivotal tokens of ``solution_ids`` in position order (see the module docstring).

    p_success(prefix_ids) -> float in [0, 1]: the estimated probability of success after
        ``query_ids + prefix_ids`` (``prefix_ids`` is a prefix of ``solution_ids``; the query is the
        caller's, named here so the signature reads like the report's). Called at most once per
        prefix, left to right as the recursion goes.
    solution_logprobs: the model's log-probability of each solution token (what splits are
        weighed by).
    """
    logprobs = _check_inputs(query_ids, solution_ids, solution_logprobs, p_gap)
    solution_ids = list(solution_ids)
    memo: dict[int, float] = {}  # prefix length -> p(success); the prefixes are all of solution_ids

    def p(k: int) -> float:
        if k not in memo:
            value = float(p_success(solution_ids[:k]))
            if not 0.0 <= value <= 1.0:
                raise PTSError(f"p_success: returned {value} for the {k}-token prefix, allowed: [0, 1]")
            memo[k] = value
        return memo[k]

    # SUBDIVIDE, iteratively (a degenerate split sequence would recurse once per token): the
    # stack pops the left half first, so leaves come out in position order.
    leaves: list[tuple[int, int]] = []
    stack = [(0, len(solution_ids))]
    while stack:
        a, b = stack.pop()
        if b - a <= 1 or abs(p(a) - p(b)) < p_gap:
            leaves.append((a, b))
            continue
        m = split_point(logprobs, a, b)
        stack.append((m, b))
        stack.append((a, m))

    found = []
    for a, b in leaves:
        if b - a == 1 and abs(p(a) - p(b)) >= p_gap:
            found.append(PivotalToken(position=a, token_id=int(solution_ids[a]), p_before=p(a), p_after=p(b)))
    return found
