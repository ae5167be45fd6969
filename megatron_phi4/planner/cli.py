"""``tools/plan_layout.py``: list the layouts that fit, fastest first, and why the others do not.

    python tools/plan_layout.py --model phi4-14b --gpus 1920 --gpu-memory 80 --seq-length 4096 --global-batch 5760
    python tools/plan_layout.py --model phi4-14b --gpus 1920 --seq-length 16384 --global-batch 1440   # mid-training
    python tools/plan_layout.py ... --json > plan.json

Every rate of the machine model is a flag (defaults: H100 SXM 80 GB nodes of 8, see
``planner/hardware.py`` and docs/planner.md); the search space can be narrowed (``--tp 2``,
``--pp 1,4``, ``--recompute full``, ``--precision bf16``, ``--micro-batch 1``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from megatron_phi4.config import MODEL_PRESETS, ConfigError, model_preset
from megatron_phi4.planner.hardware import Hardware
from megatron_phi4.planner.report import render_json, render_text
from megatron_phi4.planner.search import RECOMPUTES, SearchSpace, plan_layouts


def _ints(flag: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected comma-separated integers, got {text!r}") from None
        if any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"{flag}: values must be >= 1, got {text!r}")
        return values
    return parse


def _choices(flag: str, allowed):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(x.strip() for x in text.split(","))
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{flag}: {bad} not allowed; choose from {', '.join(allowed)}")
        return values
    return parse


def _positive(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{flag}: must be > 0, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    hw = Hardware()
    ap = argparse.ArgumentParser(prog="plan_layout.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="phi4-14b", help=f"model preset: {', '.join(MODEL_PRESETS)}")
    ap.add_argument("--gpus", type=int, required=True, help="total GPUs")
    ap.add_argument("--gpu-memory", type=_positive("--gpu-memory"), default=hw.gpu_memory_gib, help="GiB per GPU")
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    ap.add_argument("--one-document-per-row", action="store_true",
                    help="rows hold one document (DPO, unpacked data); default: packed documents, whose "
                         "per-document attention saves its output twice")
    ap.add_argument("--logits-chunk-tokens", type=int, default=None,
                    help="model.logits_chunk_tokens (tokens per chunk of the fused LM head); default: the preset's")
    g = ap.add_argument_group("machine model (GB = 1e9 bytes)")
    g.add_argument("--gpus-per-node", type=int, default=hw.gpus_per_node)
    g.add_argument("--matmul-tflops", type=_positive("--matmul-tflops"), default=hw.matmul_tflops,
                   help="bf16 GEMM rate of the projections (measured, docs/planner.md)")
    g.add_argument("--attention-tflops", type=_positive("--attention-tflops"), default=hw.attention_tflops,
                   help="causal flash attention fwd+bwd, causal FLOPs (default: measured curve, 411 at 4K, 582 at 16K)")
    g.add_argument("--fp32-matmul-tflops", type=_positive("--fp32-matmul-tflops"), default=hw.fp32_matmul_tflops)
    g.add_argument("--hbm-gb-per-s", type=_positive("--hbm-gb-per-s"), default=hw.hbm_gb_per_s)
    g.add_argument("--nvlink-gb-per-s", type=_positive("--nvlink-gb-per-s"), default=hw.nvlink_gb_per_s,
                   help="achieved NCCL bus bandwidth inside a node")
    g.add_argument("--ib-gb-per-s", type=_positive("--ib-gb-per-s"), default=hw.ib_gb_per_s,
                   help="achieved InfiniBand bandwidth per GPU (one NIC each)")
    g.add_argument("--ib-step-latency-us", type=float, default=hw.ib_step_latency_us)
    g.add_argument("--nvlink-step-latency-us", type=float, default=hw.nvlink_step_latency_us)
    g.add_argument("--reserve-gib", type=float, default=hw.reserve_gib, help="CUDA context + NCCL")
    g.add_argument("--fragmentation", type=float, default=hw.fragmentation)
    g.add_argument("--peak-tflops", type=_positive("--peak-tflops"), default=hw.peak_tflops, help="for MFU only")
    g.add_argument("--no-dp-overlap", action="store_true", help="assume FSDP communication never overlaps compute")
    s = ap.add_argument_group("search space")
    s.add_argument("--tp", type=_ints("--tp"), default=None)
    s.add_argument("--pp", type=_ints("--pp"), default=None)
    s.add_argument("--max-virtual-stages", type=int, default=4)
    s.add_argument("--micro-batch", type=_ints("--micro-batch"), default=(1, 2, 4))
    s.add_argument("--recompute", type=_choices("--recompute", RECOMPUTES), default=RECOMPUTES)
    s.add_argument("--precision", type=_choices("--precision", ("bf16", "fp32")), default=("bf16", "fp32"))
    s.add_argument("--dp-shard", type=_choices("--dp-shard", ("fsdp", "none")), default=("fsdp", "none"))
    s.add_argument("--sync-grads-every-microbatch", action="store_true",
                   help="also try the engine's sync_grads_every_microbatch (pp 1 with FSDP: no fp32 unsharded "
                        "gradient accumulation; not exposed by recipes yet)")
    s.add_argument("--pp-head-cost", type=float, default=None, help="default: the LM head in layer units")
    s.add_argument("--pp-embedding-cost", type=float, default=0.0)
    o = ap.add_argument_group("output")
    o.add_argument("--top", type=int, default=10, help="feasible layouts to list")
    o.add_argument("--show-infeasible", type=int, default=12, help="reasons to list")
    o.add_argument("--json", action="store_true", help="every candidate as JSON on stdout")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    for flag, value in (("--gpus", args.gpus), ("--seq-length", args.seq_length), ("--global-batch", args.global_batch),
                        ("--gpus-per-node", args.gpus_per_node),
                        ("--logits-chunk-tokens", 1 if args.logits_chunk_tokens is None else args.logits_chunk_tokens)):
        if value < 1:
            ap.error(f"{flag}: must be >= 1, got {value}")
    try:
        overrides = {} if args.logits_chunk_tokens is None else {"logits_chunk_tokens": args.logits_chunk_tokens}
        model = model_preset(args.model, **overrides)
    except ConfigError as e:
        ap.error(str(e))
    hw = Hardware(matmul_tflops=args.matmul_tflops, attention_tflops=args.attention_tflops,
                  fp32_matmul_tflops=args.fp32_matmul_tflops, hbm_gb_per_s=args.hbm_gb_per_s,
                  nvlink_gb_per_s=args.nvlink_gb_per_s, ib_gb_per_s=args.ib_gb_per_s,
                  ib_step_latency_us=args.ib_step_latency_us, nvlink_step_latency_us=args.nvlink_step_latency_us,
                  gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory, reserve_gib=args.reserve_gib,
                  fragmentation=args.fragmentation, peak_tflops=args.peak_tflops, overlap_dp=not args.no_dp_overlap)
    space = SearchSpace(tp=args.tp, pp=args.pp, max_virtual_stages=args.max_virtual_stages,
                        micro_batches=args.micro_batch, recomputes=args.recompute, precisions=args.precision,
                        dp_shards=args.dp_shard, pp_embedding_cost=args.pp_embedding_cost,
                        sync_grads_every_microbatch=(False, True) if args.sync_grads_every_microbatch else (False,),
                        pp_head_cost=args.pp_head_cost)
    try:
        result = plan_layouts(model, args.gpus, seq_length=args.seq_length, global_batch=args.global_batch,
                              hw=hw, space=space, packed_documents=not args.one_document_per_row)
    except ValueError as e:
        ap.error(str(e))
    if args.json:
        json.dump(render_json(result, model_name=args.model, gpus=args.gpus, seq_length=args.seq_length,
                              global_batch=args.global_batch, hw=hw, model_config=dataclasses.asdict(model)),
                  sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(render_text(result, model_name=args.model, gpus=args.gpus, seq_length=args.seq_length,
                          global_batch=args.global_batch, hw=hw, top=args.top, show_infeasible=args.show_infeasible))
    return 0 if result.feasible else 1
