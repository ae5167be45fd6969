"""The Pivotal Token Search tool: questions in, pivotal tokens and single-token DPO pairs out.

    python tools/pivotal_token_search.py --checkpoint CKPT --questions q.jsonl --oracle numeric \\
        --output pts_out/ [--rollouts 64 --p-gap 0.2 --min-p 0.2 --max-p 0.8 --temperature 1.0]
    torchrun --nproc-per-node 8 tools/pivotal_token_search.py ... [--tp 2]

For each question (report section 4.3, with the choices it leaves open marked *ours*):

1. sample ``--rollouts`` solutions of the query and check each with the oracle: p(success | Q);
2. keep the question only if ``min_p <= p <= max_p`` (the report's 0.2 and 0.8);
3. search the first ``--solutions-per-question`` sampled solutions (*ours*: 1) with
   :func:`~megatron_phi4.posttrain.pts.find_pivotal_tokens`, every p(success | Q + prefix) estimated
   by ``--rollouts`` completions (*ours*: 64; the report does not publish its count) sampled at
   ``--temperature`` (*ours*: 1, the model's own distribution) and checked by the oracle; a prefix
   that already ends the response (a stop token, or ``--max-new-tokens`` tokens) is checked as is;
4. for every pivotal token, find the opposite token among the first tokens of the rollouts already
   sampled at its prefix (most frequent first, at most ``--max-alternatives``), each verified by its
   own rollouts: for a token that raised p, an alternative whose p is at least ``--alt-gap`` (*ours*:
   p_gap / 2) below p(prefix); for one that lowered p, one at least that much above. The pair's
   prompt is ``Q + prefix`` as token ids, its completions the two single tokens. A pivotal token with
   no verified alternative is recorded without a pair.

Every estimate's rollouts are seeded by ``(--seed, question, prefix)``: a resumed or re-sharded run
draws the same samples. Questions are spread round robin over data-parallel ranks; under ``--tp``
the ranks of a tensor-parallel group work on the same question and only its first rank runs the
oracle (its verdicts are broadcast, so a timing-dependent code check cannot split the group).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from megatron_phi4.posttrain.pts import find_pivotal_tokens
from megatron_phi4.posttrain.pts_data import (
    PAIR_SOURCE,
    Journal,
    PTSDataError,
    Question,
    check_run_settings,
    export_results,
    load_codec,
    read_questions,
    _import_attr,
)

__all__ = ["PTSConfig", "SuccessEstimator", "search_question", "load_oracle", "main", "build_parser"]


@dataclass(frozen=True)
class PTSConfig:
    """Search settings; see the module docstring for which are the report's and which are ours."""

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
            if getattr(self, name) < 1:
                bad(name, "an int >= 1")
        if not 0 < self.p_gap <= 1:
            bad("p_gap", "a number in (0, 1]")
        if not 0 <= self.min_p <= self.max_p <= 1:
            bad("min_p", "0 <= min_p <= max_p <= 1")
        if self.alt_gap is not None and not 0 <= self.alt_gap <= 1:
            bad("alt_gap", "a number in [0, 1]")
        if self.temperature <= 0:
            bad("temperature", "a number > 0 (rollouts must sample)")
        if self.seed < 0:
            bad("seed", "an int >= 0")

    @property
    def alternative_gap(self) -> float:
        return self.p_gap / 2 if self.alt_gap is None else self.alt_gap


# ------------------------------------------------------------------------------------- oracles
def load_oracle(spec: str, options: dict[str, Any] | None = None):
    """An oracle by registered name (``megatron_phi4.posttrain.oracles.build_oracle``) or by
    ``module:attr`` (an oracle object, or a factory called with ``options``)."""
    options = options or {}
    if ":" in spec:
        obj = _import_attr(spec, "--oracle")
        return obj(**options) if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "check")) else obj
    try:
        from megatron_phi4.posttrain.oracles import build_oracle
    except ImportError as e:
        raise PTSDataError(f"--oracle {spec}: the oracle registry (megatron_phi4.posttrain.oracles) is "
                           f"not available ({e}); name an oracle as 'module:attribute'") from None
    return build_oracle(spec, **options)


def _check_many(oracle, texts: list[str], reference: str) -> list[bool]:
    if hasattr(oracle, "check_many"):
        results = oracle.check_many(texts, reference)
    else:
        results = [oracle.check(t, reference) for t in texts]
    return [bool(r.passed) for r in results]


# ----------------------------------------------------------------------------------- estimation
@dataclass
class Estimate:
    """p(success | Q + prefix) and the rollouts behind it."""

    p: float
    rollouts: int  # 0: the prefix already ends the response and was checked as is
    first_tokens: list[tuple[int, bool]] = field(default_factory=list)  # (first new token, passed)
    samples: list | None = None  # the generated continuations (kept for the empty prefix only)
    verdicts: list[bool] | None = None


def _stable_seed(*parts) -> int:
    h = hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class SuccessEstimator:
    """Memoized rollout estimates of p(success | Q + prefix) for one question."""

    def __init__(self, model, question: Question, oracle_fn: Callable[[list[str]], list[bool]], codec,
                 cfg: PTSConfig, generate_fn=None):
        from megatron_phi4.generation import generate

        self.model, self.q, self.oracle_fn, self.codec, self.cfg = model, question, oracle_fn, codec, cfg
        self.generate = generate_fn or generate
        self.stop_ids = list(codec.stop_token_ids)
        self.memo: dict[tuple[int, ...], Estimate] = {}
        self.rollouts = 0

    def text(self, response_ids: Sequence[int]) -> str:
        """The response as the oracle reads it (a final stop token is not text)."""
        ids = list(response_ids)
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return self.codec.decode(ids)

    def ended(self, prefix: Sequence[int]) -> bool:
        return bool(prefix) and (prefix[-1] in self.stop_ids or len(prefix) >= self.cfg.max_new_tokens)

    def estimate(self, prefix: Sequence[int]) -> Estimate:
        key = tuple(prefix)
        if key in self.memo:
            return self.memo[key]
        if self.ended(key):
            est = Estimate(p=float(self.oracle_fn([self.text(key)])[0]), rollouts=0)
        else:
            cfg = self.cfg
            samples = self.generate(
                self.model, [list(self.q.prompt_ids) + list(key)], max_new_tokens=cfg.max_new_tokens - len(key),
                temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, num_samples=cfg.rollouts,
                stop_token_ids=self.stop_ids, seed=_stable_seed(cfg.seed, self.q.key, key))[0]
            verdicts = self.oracle_fn([self.text(key + tuple(s.token_ids)) for s in samples])
            self.rollouts += len(samples)
            est = Estimate(p=sum(verdicts) / len(verdicts), rollouts=len(samples),
                           first_tokens=[(s.token_ids[0], v) for s, v in zip(samples, verdicts)],
                           samples=samples if not key else None, verdicts=verdicts if not key else None)
        self.memo[key] = est
        return est

    def p(self, prefix: Sequence[int]) -> float:
        return self.estimate(prefix).p


def _alternatives(est: Estimate, exclude: int, limit: int) -> list[int]:
    """First tokens of the rollouts at a prefix, most frequent first (ties: first seen), minus one."""
    counts = Counter(t for t, _ in est.first_tokens)
    first_seen = {}
    for i, (t, _) in enumerate(est.first_tokens):
        first_seen.setdefault(t, i)
    ranked = sorted((t for t in counts if t != exclude), key=lambda t: (-counts[t], first_seen[t]))
    return ranked[:limit]


def search_question(model, question: Question, oracle_fn, codec, cfg: PTSConfig, generate_fn=None) -> dict:
    """Everything the tool does for one question; returns its journal record."""
    t0 = time.perf_counter()
    est = SuccessEstimator(model, question, oracle_fn, codec, cfg, generate_fn)
    root = est.estimate(())
    record: dict[str, Any] = {"question": question.key, "index": question.index, "p_query": root.p,
                              "pivots": [], "pairs": []}
    if not cfg.min_p <= root.p <= cfg.max_p:
        record.update(status="outside_window", rollouts=est.rollouts, seconds=time.perf_counter() - t0)
        return record
    query = list(question.prompt_ids)
    for j, (sample, passed) in enumerate(zip(root.samples[:cfg.solutions_per_question], root.verdicts)):
        solution = list(sample.token_ids)
        if est.ended(solution):  # its own verdict is its p: no need to check it again
            est.memo.setdefault(tuple(solution), Estimate(p=float(passed), rollouts=0))
        pivots = find_pivotal_tokens(query, solution, sample.logprobs, est.p, p_gap=cfg.p_gap)
        for piv in pivots:
            prefix = solution[:piv.position]
            rec = {"question": question.key, "solution": j, "solution_passed": bool(passed),
                   "position": piv.position, "token_id": piv.token_id, "token_text": codec.decode([piv.token_id]),
                   "p_before": piv.p_before, "p_after": piv.p_after, "prompt_ids": query + prefix,
                   "alternatives": [], "pair": None}
            raised = piv.p_after > piv.p_before
            for alt in _alternatives(est.estimate(prefix), piv.token_id, cfg.max_alternatives):
                p_alt = est.p(prefix + [alt])
                rec["alternatives"].append({"token_id": alt, "p": p_alt})
                gap = cfg.alternative_gap
                if (raised and p_alt <= piv.p_before - gap) or (not raised and p_alt >= piv.p_before + gap):
                    chosen, rejected = (piv.token_id, alt) if raised else (alt, piv.token_id)
                    rec["pair"] = {"chosen_id": chosen, "rejected_id": rejected}
                    record["pairs"].append({"prompt_ids": query + prefix, "chosen_ids": [chosen],
                                            "rejected_ids": [rejected], "source": PAIR_SOURCE})
                    break
            record["pivots"].append(rec)
    record.update(status="searched", rollouts=est.rollouts, seconds=time.perf_counter() - t0)
    return record


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    d = PTSConfig()
    ap = argparse.ArgumentParser(
        prog="pivotal_token_search.py",
        description="Pivotal Token Search (Phi-4 report 4.3): pivotal-token records and DPO pairs, as token "
                    "ids. See docs/posttraining.md.")
    ap.add_argument("--checkpoint", required=True, help="project checkpoint (or run root with 'latest')")
    ap.add_argument("--questions", required=True, help="JSONL: id, prompt_ids | messages, reference")
    ap.add_argument("--oracle", required=True,
                    help="registered oracle name (numeric, multiple_choice, code) or module:attribute")
    ap.add_argument("--oracle-option", action="append", default=[], metavar="KEY=JSON",
                    help="keyword for the oracle's constructor, e.g. timeout_s=5 (repeatable)")
    ap.add_argument("--output", required=True, help="output directory (resumed if it exists)")
    ap.add_argument("--id-map", help="trimmed vocabulary: JSON list of Phi-4 ids, or a file with 'phi4_ids'")
    ap.add_argument("--codec", help="module:attribute of a codec (decode, encode_chat, stop_token_ids)")
    ap.add_argument("--rollouts", type=int, default=d.rollouts, help="rollouts per p estimate (ours: %(default)s; "
                    "the report does not publish its count)")
    ap.add_argument("--p-gap", type=float, default=d.p_gap,
                    help="pivot threshold on |delta p| (default %(default)s, the report's illustration)")
    ap.add_argument("--min-p", type=float, default=d.min_p, help="search questions with p >= this (report: 0.2)")
    ap.add_argument("--max-p", type=float, default=d.max_p, help="... and p <= this (report: 0.8)")
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--top-p", type=float, default=d.top_p)
    ap.add_argument("--top-k", type=int, default=d.top_k)
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="longest response")
    ap.add_argument("--solutions-per-question", type=int, default=d.solutions_per_question)
    ap.add_argument("--alt-gap", type=float, default=None, help="how far an alternative token must move p the "
                    "other way (default p_gap / 2)")
    ap.add_argument("--max-alternatives", type=int, default=d.max_alternatives)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (world = tp x data-parallel)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--dtype", default="keep", choices=["keep", "fp32", "bf16"])
    ap.add_argument("--limit", type=int, default=None, help="stop after this many new questions per rank")
    ap.add_argument("--export-only", action="store_true", help="rewrite the exported files from the journals")
    return ap


def _oracle_options(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PTSDataError(f"--oracle-option {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _log(msg: str) -> None:
    print(f"[pts] {msg}", file=sys.stderr, flush=True)


def _setup_model(args, vocab_size):
    """(model, dp_rank, dp_size, tp_group, is_writer) for this process."""
    import torch

    import megatron_phi4
    from megatron_phi4.config import ParallelConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dtype = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if world == 1 and args.tp == 1:
        device = "cuda" if use_cuda else "cpu"
        return megatron_phi4.load_model(args.checkpoint, device=device, dtype=dtype), 0, 1, None, True
    from megatron_phi4.distributed import init_distributed

    pcfg = ParallelConfig(tp=args.tp, dp_shard="none", backend="nccl" if use_cuda else "gloo",
                          mixed_precision="fp32", timeout_minutes=60.0)
    full = megatron_phi4.load_model(args.checkpoint, device="cpu", dtype=dtype)
    dims = init_distributed(pcfg, full.config)
    if args.tp == 1:
        model = full.to(dims.device)
    else:
        from megatron_phi4.distributed import ParallelEngine

        engine = ParallelEngine(full.config, pcfg, dims, full_state_dict=full.state_dict(), device=dims.device)
        model = engine.model_parts[0].to(next(full.parameters()).dtype).eval()
        del full
    return model, dims.dp_rank, dims.dp, dims.tp_group if args.tp > 1 else None, dims.tp_rank == 0


class BadReference(ValueError):
    """The oracle rejected a question's reference (the question's data error, not a wrong rollout)."""


def _oracle_fn(oracle, reference_of: Callable[[], str], tp_group):
    """Verdicts for texts; under TP only the group's first rank checks and broadcasts the result
    (or the oracle's error, so the whole group raises it together)."""
    def fn(texts: list[str]) -> list[bool]:
        result = None
        if tp_group is None or _tp_first(tp_group):
            try:
                result = ("ok", _check_many(oracle, texts, reference_of()))
            except ValueError as e:
                result = ("bad_reference", str(e))
        if tp_group is not None:
            import torch.distributed as dist
            box = [result]
            dist.broadcast_object_list(box, src=dist.get_global_rank(tp_group, 0), group=tp_group)
            result = box[0]
        if result[0] != "ok":
            raise BadReference(result[1])
        return result[1]
    return fn


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _tp_first(group) -> bool:
    import torch.distributed as dist
    return dist.get_rank(group) == 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except PTSDataError as e:
        print(f"pivotal_token_search: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from megatron_phi4.checkpoint import format as ckpt_format

    cfg = PTSConfig(rollouts=args.rollouts, p_gap=args.p_gap, min_p=args.min_p, max_p=args.max_p,
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens, solutions_per_question=args.solutions_per_question,
                    alt_gap=args.alt_gap, max_alternatives=args.max_alternatives, seed=args.seed)
    # Everything that can be wrong with the inputs fails here, before the model is loaded.
    codec = load_codec(args.id_map, args.codec)
    try:
        model_cfg = ckpt_format.model_config_from_meta(ckpt_format.read_meta(
            ckpt_format.resolve_checkpoint(args.checkpoint)))
    except ckpt_format.CheckpointError as e:
        raise PTSDataError(f"--checkpoint: {e}") from None
    questions = read_questions(args.questions, codec, model_cfg.vocab_size)
    if args.export_only:
        s = export_results(args.output, questions)
        _log(f"exported {s['pivotal_tokens']} pivotal tokens, {s['pairs']} pairs from {s['questions_done']} "
             f"questions to {args.output}")
        return 0
    oracle = load_oracle(args.oracle, _oracle_options(args.oracle_option))

    model, dp_rank, dp_size, tp_group, writer = _setup_model(args, model_cfg.vocab_size)
    if writer:
        check_run_settings(args.output, {"checkpoint": os.path.abspath(args.checkpoint),
                                         "questions": os.path.abspath(args.questions), "oracle": args.oracle,
                                         "oracle_options": _oracle_options(args.oracle_option),
                                         **asdict(cfg)})
    journal = Journal(args.output, dp_rank)
    if writer:
        journal.repair()
    # Every rank must shard the same to-do list: all read the journals before any rank appends.
    _barrier()
    done = Journal.read_all(args.output) if os.path.isdir(args.output) else {}
    _barrier()
    todo = [q for q in questions if q.key not in done]
    mine = todo[dp_rank::dp_size][:args.limit]
    _log(f"rank {dp_rank}/{dp_size}: {len(questions)} questions, {len(done)} done, {len(todo)} to do, "
         f"{len(mine)} on this rank; {cfg.rollouts} rollouts per estimate, p_gap {cfg.p_gap}, "
         f"window [{cfg.min_p}, {cfg.max_p}]")
    current: list[Question] = []
    verdicts = _oracle_fn(oracle, lambda: current[0].reference, tp_group)
    totals = Counter()
    for n, q in enumerate(mine, 1):
        current[:] = [q]
        try:
            rec = search_question(model, q, verdicts, codec, cfg)
        except BadReference as e:  # recorded, so a resumed run does not retry it
            rec = {"question": q.key, "index": q.index, "status": "bad_reference", "error": str(e),
                   "p_query": None, "rollouts": 0, "pivots": [], "pairs": [], "seconds": 0.0}
        if writer:
            journal.append(rec)
        totals.update(rollouts=rec["rollouts"], pivots=len(rec["pivots"]), pairs=len(rec["pairs"]),
                      searched=rec["status"] == "searched")
        per = f"{totals['rollouts'] / totals['pivots']:.0f}" if totals["pivots"] else "-"
        p_txt = "-" if rec["p_query"] is None else f"{rec['p_query']:.2f}"
        _log(f"rank {dp_rank}: {n}/{len(mine)} {q.key}: p={p_txt} {rec['status']}"
             f"{' (' + rec['error'] + ')' if 'error' in rec else ''}, "
             f"{len(rec['pivots'])} pivotal, {len(rec['pairs'])} pairs, {rec['rollouts']} rollouts, "
             f"{rec['seconds']:.1f}s | rank total: {totals['pivots']} pivotal, {totals['pairs']} pairs, "
             f"{per} rollouts/pivotal")
    if writer:
        s = export_results(args.output, questions)
        per = "-" if s["rollouts_per_pivotal_token"] is None else f"{s['rollouts_per_pivotal_token']:.1f}"
        _log(f"rank {dp_rank}: exported {s['questions_done']}/{len(questions)} questions: "
             f"{s['questions_in_window']} in the window, {s['pivotal_tokens']} pivotal tokens, {s['pairs']} pairs, "
             f"{s['rollouts']} rollouts ({per} per pivotal token) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
