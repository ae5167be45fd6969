"""The Pivotal Token Search tool: questions in, pivotal-token records and single-token DPO pairs out.

    python tools/pivotal_token_search.py --checkpoint CKPT --questions q.jsonl --oracle numeric \\
        --output pts_out/ [--rollouts 64 --p-gap 0.2 --min-p 0.2 --max-p 0.8 --temperature 1.0]
    torchrun --nproc-per-node 8 tools/pivotal_token_search.py ... [--tp 2]

What happens per question is :func:`~megatron_phi4.posttrain.pts_search.search_question`; the
files are described in :mod:`~megatron_phi4.posttrain.pts_data`. This module adds the run around
it: inputs checked before the model loads (questions, id map, settings, references where the oracle
can check them cheaply), the model on one device or split over a tensor-parallel group, questions
spread round robin over the data-parallel ranks, one progress line per question, and a resumable
output (a finished question is one fsynced journal line; a restart skips finished questions).

Under ``--tp`` the ranks of a tensor-parallel group work on the same question and only its first
rank runs the oracle and writes the journal.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict
from typing import Any, Callable, Sequence

from megatron_phi4.posttrain.pts_data import (
    Journal, PTSDataError, TokenCodec, check_run_settings, export_results, import_attr, load_id_map,
    read_questions,
)
from megatron_phi4.posttrain.pts_search import OracleVerdicts, PTSConfig, search_question

__all__ = ["build_parser", "load_oracle", "main", "run"]


def load_oracle(spec: str, options: dict[str, Any] | None = None):
    """An oracle by registered name (``megatron_phi4.posttrain.oracles.build_oracle``: numeric,
    multiple_choice, code) or by ``module:attribute`` (an oracle object, or a class / factory
    called with ``options``)."""
    options = options or {}
    if ":" in spec:
        obj = import_attr(spec, "--oracle")
        if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "check")):
            obj = obj(**options)
        if not hasattr(obj, "check"):
            raise PTSDataError(f"--oracle {spec}: not an oracle (needs check(candidate, reference))")
        return obj
    try:
        from megatron_phi4.posttrain.oracles import build_oracle
    except ImportError as e:
        raise PTSDataError(f"--oracle {spec}: the oracle registry (megatron_phi4.posttrain.oracles) is not "
                           f"available ({e}); name an oracle as 'module:attribute'") from None
    try:
        return build_oracle(spec, **options)
    except (KeyError, TypeError, ValueError) as e:
        raise PTSDataError(f"--oracle {spec}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    d = PTSConfig()
    ap = argparse.ArgumentParser(
        prog="pivotal_token_search.py",
        description="Pivotal Token Search (Phi-4 report 4.3): pivotal-token records and single-token DPO "
                    "pairs, as token ids. See docs/posttraining.md.")
    ap.add_argument("--checkpoint", required=True, help="project checkpoint (or a run root with 'latest')")
    ap.add_argument("--questions", required=True,
                    help="JSONL: id, prompt_ids | messages | prompt/question (+ system), reference")
    ap.add_argument("--oracle", required=True,
                    help="registered oracle name (numeric, multiple_choice, code) or module:attribute")
    ap.add_argument("--oracle-option", action="append", default=[], metavar="KEY=JSON",
                    help="keyword for the oracle's constructor, e.g. timeout_s=5 (repeatable)")
    ap.add_argument("--output", required=True, help="output directory (resumed if it exists)")
    ap.add_argument("--id-map", help="trimmed vocabulary: a vocab.json (or its directory) with 'phi4_ids', "
                    "or module:attribute of an object with to_phi4 / to_trimmed")
    ap.add_argument("--rollouts", type=int, default=d.rollouts,
                    help="rollouts per p estimate (ours: %(default)s; the report does not publish its count)")
    ap.add_argument("--p-gap", type=float, default=d.p_gap,
                    help="pivot threshold on |delta p| (%(default)s: the report's illustration; not published)")
    ap.add_argument("--min-p", type=float, default=d.min_p, help="search questions with p >= this (report: 0.2)")
    ap.add_argument("--max-p", type=float, default=d.max_p, help="... and p <= this (report: 0.8)")
    ap.add_argument("--temperature", type=float, default=d.temperature, help="rollout temperature (ours: 1)")
    ap.add_argument("--top-p", type=float, default=d.top_p)
    ap.add_argument("--top-k", type=int, default=d.top_k)
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="longest response, in tokens")
    ap.add_argument("--solutions-per-question", type=int, default=d.solutions_per_question)
    ap.add_argument("--alt-gap", type=float, default=None,
                    help="how far an alternative token must move p the other way (default: p_gap / 2)")
    ap.add_argument("--max-alternatives", type=int, default=d.max_alternatives)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (world = tp x data-parallel)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    ap.add_argument("--dtype", default="keep", choices=["keep", "fp32", "bf16"])
    ap.add_argument("--limit", type=int, default=None, help="stop after this many new questions per rank")
    ap.add_argument("--export-only", action="store_true", help="rebuild the exported files from the journals")
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


def _check_references(oracle, questions) -> None:
    """Where the oracle can read a reference without running anything (``parse_reference``), every
    question's is checked now, before the model loads; others are checked per question."""
    parse = getattr(oracle, "parse_reference", None)
    if parse is None:
        return
    bad = []
    for q in questions:
        try:
            parse(q.reference)
        except (ValueError, TypeError) as e:
            bad.append(f"{q.where}: reference: {e}")
    if bad:
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise PTSDataError("bad references:\n  " + "\n  ".join(bad[:10]) + more)


def _setup_model(args, load_model: Callable):
    """(model, dp_rank, dp_size, tp_group, is_writer, is_global_rank0) for this process."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dtype = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if world == 1 and args.tp == 1:
        return load_model(args.checkpoint, device="cuda" if use_cuda else "cpu", dtype=dtype), 0, 1, None, True, True
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.distributed import init_distributed

    pcfg = ParallelConfig(tp=args.tp, dp_shard="none", backend="nccl" if use_cuda else "gloo",
                          mixed_precision="fp32", timeout_minutes=120.0)
    full = load_model(args.checkpoint, device="cpu", dtype=dtype)
    dims = init_distributed(pcfg, full.config)
    if args.tp == 1:
        model = full.to(dims.device)
    else:
        from megatron_phi4.engine import ParallelEngine

        engine = ParallelEngine(full.config, pcfg, dims, full_state_dict=full.state_dict(), device=dims.device)
        model = engine.model_parts[0].to(next(full.parameters()).dtype).eval()
        del full
    tp_group = dims.tp_group if args.tp > 1 else None
    return model, dims.dp_rank, dims.dp, tp_group, dims.tp_rank == 0, dims.rank == 0


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def main(argv: Sequence[str] | None = None, *, load_model: Callable | None = None) -> int:
    """The CLI. ``load_model(path, device=, dtype=)``: the checkpoint loader
    (``megatron_phi4.load_model``; passed in by the tool, which sits above this package)."""
    args = build_parser().parse_args(argv)
    if load_model is None:
        raise TypeError("main: pass load_model (megatron_phi4.load_model)")
    try:
        return run(args, load_model)
    except PTSDataError as e:
        print(f"pivotal_token_search: error: {e}", file=sys.stderr)
        return 2


def run(args, load_model: Callable) -> int:
    from megatron_phi4.checkpoint import format as ckpt_format
    from megatron_phi4.generation import shard_items

    cfg = PTSConfig(rollouts=args.rollouts, p_gap=args.p_gap, min_p=args.min_p, max_p=args.max_p,
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens, solutions_per_question=args.solutions_per_question,
                    alt_gap=args.alt_gap, max_alternatives=args.max_alternatives, seed=args.seed)
    if args.limit is not None and args.limit < 1:
        raise PTSDataError(f"--limit: got {args.limit}, allowed: an int >= 1")
    # Everything that can be wrong with the inputs fails here, before the model is loaded.
    codec = TokenCodec(load_id_map(args.id_map))
    try:
        model_cfg = ckpt_format.model_config_from_meta(ckpt_format.read_meta(
            ckpt_format.resolve_checkpoint(args.checkpoint)))
    except ckpt_format.CheckpointError as e:
        raise PTSDataError(f"--checkpoint: {e}") from None
    questions = read_questions(args.questions, codec, model_cfg.vocab_size)
    if not codec.stop_token_ids:
        raise PTSDataError("--id-map: maps neither <|im_end|> nor <|endoftext|>: responses could never end")
    if args.export_only:
        s = export_results(args.output, questions)
        _log(f"exported {s['pivotal_tokens']} pivotal tokens, {s['pairs']} pairs from {s['questions_done']} "
             f"questions to {args.output}")
        return 0
    options = _oracle_options(args.oracle_option)
    oracle = load_oracle(args.oracle, options)
    _check_references(oracle, questions)
    settings = {"checkpoint": os.path.abspath(args.checkpoint), "questions": os.path.abspath(args.questions),
                "oracle": args.oracle, "oracle_options": options, "id_map": args.id_map, **asdict(cfg)}
    check_run_settings(args.output, settings, write=False)  # a mismatch fails before the model loads

    model, dp_rank, dp_size, tp_group, writer, rank0 = _setup_model(args, load_model)
    if rank0:
        check_run_settings(args.output, settings)
    journal = Journal(args.output, dp_rank)
    if writer:
        journal.repair()
    # Every rank must shard the same to-do list: all read the journals before any rank appends.
    _barrier()
    done = Journal.read_all(args.output) if os.path.isdir(args.output) else {}
    _barrier()
    todo = [q for q in questions if q.key not in done]
    mine = [q for _, q in shard_items(todo, dp_rank, dp_size)][:args.limit]
    _log(f"rank {dp_rank}/{dp_size}: {len(questions)} questions, {len(done)} done, {len(todo)} to do, "
         f"{len(mine)} on this rank; {cfg.rollouts} rollouts per estimate, p_gap {cfg.p_gap}, "
         f"window [{cfg.min_p}, {cfg.max_p}], temperature {cfg.temperature}")
    verdicts = OracleVerdicts(oracle, tp_group)
    totals: Counter = Counter()
    t_start = time.perf_counter()
    for n, q in enumerate(mine, 1):
        rec = search_question(model, q, verdicts, codec, cfg)
        if writer:
            journal.append(rec)
        pairs = sum(1 for p in rec["pivots"] if p["pair"])
        totals.update(rollouts=rec["rollouts"], pivots=len(rec["pivots"]), pairs=pairs)
        per = f"{totals['rollouts'] / totals['pivots']:.0f}" if totals["pivots"] else "-"
        p_txt = "-" if rec["p_query"] is None else f"{rec['p_query']:.2f}"
        elapsed = time.perf_counter() - t_start
        _log(f"rank {dp_rank}: {n}/{len(mine)} {q.key}: p={p_txt} {rec['status']}"
             f"{' (' + rec['error'] + ')' if 'error' in rec else ''}: {len(rec['pivots'])} pivotal, {pairs} pairs, "
             f"{rec['rollouts']} rollouts, {rec['seconds']:.1f}s | rank: {totals['pivots']} pivotal, "
             f"{totals['pairs']} pairs, {per} rollouts/pivotal, {elapsed / n:.1f}s/question, "
             f"~{elapsed / n * (len(mine) - n):.0f}s left")
    if writer:
        s = export_results(args.output, questions)
        per = "-" if s["rollouts_per_pivotal_token"] is None else f"{s['rollouts_per_pivotal_token']:.1f}"
        _log(f"rank {dp_rank}: exported {s['questions_done']}/{len(questions)} questions "
             f"{s['questions_by_status']}: {s['pivotal_tokens']} pivotal tokens, {s['pairs']} pairs, "
             f"{s['rollouts']} rollouts ({per} per pivotal token) -> {args.output}")
    return 0
