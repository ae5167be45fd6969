"""Pivotal Token Search for one question: p(success) by rollouts through an oracle, the search, and
single-token DPO pairs whose two tokens are each verified by their own rollouts.

For a question (report section 4.3; the choices it leaves open are marked *ours*):

1. sample ``rollouts`` solutions of the query and check each with the oracle: p(success | Q);
2. keep the question only if ``min_p <= p <= max_p`` (the report's 0.2 and 0.8);
3. search the first ``solutions_per_question`` sampled solutions (*ours*: 1) with
   :func:`~megatron_phi4.posttrain.pts.find_pivotal_tokens`; every p(success | Q + prefix) is
   estimated from ``rollouts`` completions (*ours*: 64; the report does not publish its count)
   sampled at ``temperature`` (*ours*: 1, the model's own distribution) and checked by the oracle.
   A prefix that already ends the response (a stop token, or ``max_new_tokens`` tokens) is checked
   as it is. Responses never exceed ``max_new_tokens`` tokens, prefix included;
4. for every pivotal token, look for the opposite token among the first tokens of the rollouts
   already sampled at its prefix (most frequent first, at most ``max_alternatives``), each verified
   by its own rollouts: for a token that raised p, an alternative whose p is at least ``alt_gap``
   (*ours*: p_gap / 2) below p(prefix); for one that lowered p, one at least that much above. The
   pair's prompt is ``Q + prefix``, its completions the two single tokens, all as token ids. A
   pivotal token with no verified alternative is recorded without a pair.

Every estimate's rollouts are seeded by ``(seed, question id, prefix)`` (per-sample streams of
:mod:`megatron_phi4.generation`), so a resumed, re-sharded or tensor-parallel run draws the same
samples as a single process.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from megatron_phi4.posttrain.pts import find_pivotal_tokens
from megatron_phi4.posttrain.pts_data import PTSDataError, Question, TokenCodec

__all__ = ["PTSConfig", "BadReference", "OracleFailure", "OracleVerdicts", "SuccessEstimator",
           "search_question"]


@dataclass(frozen=True)
class PTSConfig:
    """Search settings; the module docstring says which are the report's and which are ours."""

    rollouts: int = 64
    p_gap: float = 0.2
    min_p: float = 0.2
    max_p: float = 0.8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    solutions_per_question: int = 1
    alt_gap: float | None = None  # None: p_gap / 2
    max_alternatives: int = 4
    seed: int = 0

    def __post_init__(self):
        def bad(name, allowed):
            raise PTSDataError(f"--{name.replace('_', '-')}: got {getattr(self, name)!r}, allowed: {allowed}")

        for name in ("rollouts", "max_new_tokens", "solutions_per_question", "max_alternatives"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "an int >= 1")
        if not 0 < self.p_gap <= 1:
            bad("p_gap", "a number in (0, 1]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "a number in [0, 1]")
        if not self.min_p <= self.max_p <= 1:
            bad("max_p", f"a number in [min_p ({self.min_p}), 1]")
        if self.alt_gap is not None and not 0 <= self.alt_gap <= 1:
            bad("alt_gap", "a number in [0, 1]")
        if not self.temperature > 0:
            bad("temperature", "a number > 0 (rollouts must sample)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if self.top_k < 0:
            bad("top_k", "an int >= 0 (0: off)")
        if self.seed < 0:
            bad("seed", "an int >= 0")

    @property
    def alternative_gap(self) -> float:
        return self.p_gap / 2 if self.alt_gap is None else self.alt_gap


# ------------------------------------------------------------------------------------- oracles
class BadReference(ValueError):
    """The oracle rejected a question's reference: the question's data error, not a wrong rollout.
    The question is recorded as such (a resumed run does not retry it) and the run goes on."""


class OracleFailure(RuntimeError):
    """The oracle failed for another reason (e.g. no sandbox on this machine): the run stops."""


class OracleVerdicts:
    """``verdicts(texts, reference) -> [bool]`` through ``oracle.check_many`` (or ``check``).

    Under tensor parallelism only the TP group's first rank runs the oracle and broadcasts the
    verdicts -- or its error, so every rank of the group raises the same exception at the same
    point instead of the others waiting forever in the next collective (and a timing-dependent
    code check can never split the group's control flow).
    """

    def __init__(self, oracle, tp_group=None):
        self.oracle, self.tp_group = oracle, tp_group

    def _local(self, texts: list[str], reference: str):
        try:
            if hasattr(self.oracle, "check_many"):
                results = self.oracle.check_many(texts, reference)
            else:
                results = [self.oracle.check(t, reference) for t in texts]
            return "ok", [bool(r.passed) for r in results]
        except ValueError as e:  # the Oracle interface: a bad reference raises ValueError
            return "bad_reference", str(e)
        except Exception as e:  # noqa: BLE001 -- carried to every TP rank, raised there
            return "failure", f"{type(e).__name__}: {e}"

    def __call__(self, texts: list[str], reference: str) -> list[bool]:
        result = None
        if self.tp_group is None:
            result = self._local(texts, reference)
        else:
            import torch.distributed as dist

            if dist.get_rank(self.tp_group) == 0:
                result = self._local(texts, reference)
            box = [result]
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
            result = box[0]
        status, value = result
        if status == "bad_reference":
            raise BadReference(value)
        if status == "failure":
            raise OracleFailure(f"the oracle failed: {value}")
        if len(value) != len(texts):
            raise OracleFailure(f"the oracle returned {len(value)} verdicts for {len(texts)} responses")
        return value


# ----------------------------------------------------------------------------------- estimation
@dataclass
class Estimate:
    """p(success | Q + prefix) and the rollouts behind it."""

    p: float
    rollouts: int  # 0: the prefix already ends the response and was checked as it is
    first_tokens: list[int] = field(default_factory=list)  # first new token of each rollout
    samples: list | None = None  # the continuations themselves (kept for the empty prefix only)
    verdicts: list[bool] | None = None


def _stable_seed(*parts) -> int:
    h = hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class SuccessEstimator:
    """Memoized rollout estimates of p(success | Q + prefix) for one question."""

    def __init__(self, model, question: Question, verdicts: Callable[[list[str], str], list[bool]],
                 codec: TokenCodec, cfg: PTSConfig, generate_fn=None):
        from megatron_phi4.generation import generate

        self.model, self.q, self.verdicts, self.codec, self.cfg = model, question, verdicts, codec, cfg
        self.generate = generate_fn or generate
        self.stop_ids = list(codec.stop_token_ids)
        self.memo: dict[tuple[int, ...], Estimate] = {}
        self.rollouts = 0

    def text(self, response_ids: Sequence[int]) -> str:
        """The response as the oracle reads it (a closing stop token is not text)."""
        ids = list(response_ids)
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return self.codec.decode(ids)

    def ended(self, prefix: Sequence[int]) -> bool:
        return bool(prefix) and (prefix[-1] in self.stop_ids or len(prefix) >= self.cfg.max_new_tokens)

    def check(self, responses: list[Sequence[int]]) -> list[bool]:
        return self.verdicts([self.text(r) for r in responses], self.q.reference)

    def estimate(self, prefix: Sequence[int]) -> Estimate:
        key = tuple(prefix)
        if key in self.memo:
            return self.memo[key]
        if self.ended(key):
            est = Estimate(p=float(self.check([key])[0]), rollouts=0)
        else:
            cfg = self.cfg
            samples = self.generate(
                self.model, [list(self.q.prompt_ids) + list(key)], max_new_tokens=cfg.max_new_tokens - len(key),
                temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, num_samples=cfg.rollouts,
                stop_token_ids=self.stop_ids, seed=_stable_seed(cfg.seed, self.q.key, key))[0]
            self.rollouts += len(samples)  # spent, whatever the oracle says next
            verdicts = self.check([key + tuple(s.token_ids) for s in samples])
            est = Estimate(p=sum(verdicts) / len(verdicts), rollouts=len(samples),
                           first_tokens=[s.token_ids[0] for s in samples],
                           samples=samples if not key else None, verdicts=verdicts if not key else None)
        self.memo[key] = est
        return est

    def p(self, prefix: Sequence[int]) -> float:
        return self.estimate(prefix).p


def _alternatives(est: Estimate, exclude: int, limit: int) -> list[int]:
    """First tokens of the rollouts at a prefix, most frequent first (ties: first seen), minus one."""
    counts = Counter(est.first_tokens)
    first_seen: dict[int, int] = {}
    for i, t in enumerate(est.first_tokens):
        first_seen.setdefault(t, i)
    ranked = sorted((t for t in counts if t != exclude), key=lambda t: (-counts[t], first_seen[t]))
    return ranked[:limit]


def search_question(model, question: Question, verdicts, codec: TokenCodec, cfg: PTSConfig,
                    generate_fn=None) -> dict:
    """Everything the tool does for one question; returns its journal record, whose ``status`` is
    "searched", "outside_window" (p(success | Q) outside [min_p, max_p]) or "bad_reference" (the
    oracle rejected the reference: the question's data error, recorded so that a resumed run does
    not retry it)."""
    t0 = time.perf_counter()
    est = SuccessEstimator(model, question, verdicts, codec, cfg, generate_fn)
    record: dict[str, Any] = {"question": question.key, "index": question.index, "p_query": None, "pivots": []}
    try:
        est.check([()])  # the reference is valid before any rollout is spent on it
        return _search(est, question, codec, cfg, record, t0)
    except BadReference as e:
        record.update(status="bad_reference", error=f"{question.where}: reference: {e}", pivots=[],
                      rollouts=est.rollouts, seconds=time.perf_counter() - t0)
        return record


def _search(est: SuccessEstimator, question: Question, codec: TokenCodec, cfg: PTSConfig, record: dict,
            t0: float) -> dict:
    root = est.estimate(())
    record["p_query"] = root.p
    if not cfg.min_p <= root.p <= cfg.max_p:
        record.update(status="outside_window", rollouts=est.rollouts, seconds=time.perf_counter() - t0)
        return record
    query = list(question.prompt_ids)
    for j, (sample, passed) in enumerate(zip(root.samples[:cfg.solutions_per_question], root.verdicts)):
        solution = list(sample.token_ids)
        if est.ended(solution):  # its own verdict is its p: no need to check it again
            est.memo.setdefault(tuple(solution), Estimate(p=float(passed), rollouts=0))
        for piv in find_pivotal_tokens(query, solution, sample.logprobs, est.p, p_gap=cfg.p_gap):
            prefix = solution[:piv.position]
            before, after = est.estimate(prefix), est.estimate(solution[:piv.position + 1])
            rec = {"question": question.key, "solution": j, "solution_passed": bool(passed),
                   "query_len": len(query), "position": piv.position, "token_id": piv.token_id,
                   "token_text": codec.decode([piv.token_id]), "p_before": piv.p_before, "p_after": piv.p_after,
                   "rollouts_before": before.rollouts, "rollouts_after": after.rollouts,
                   "prompt_ids": query + prefix, "alternatives": [], "pair": None}
            raised = piv.p_after > piv.p_before
            gap = cfg.alternative_gap
            for alt in _alternatives(before, piv.token_id, cfg.max_alternatives):
                alt_est = est.estimate(prefix + [alt])
                rec["alternatives"].append({"token_id": alt, "token_text": codec.decode([alt]), "p": alt_est.p,
                                            "rollouts": alt_est.rollouts})
                if (raised and alt_est.p <= piv.p_before - gap) or (not raised and alt_est.p >= piv.p_before + gap):
                    chosen, rejected = (piv.token_id, alt) if raised else (alt, piv.token_id)
                    rec["pair"] = {"chosen_id": chosen, "rejected_id": rejected}
                    break
            record["pivots"].append(rec)
    record.update(status="searched", rollouts=est.rollouts, seconds=time.perf_counter() - t0)
    return record
