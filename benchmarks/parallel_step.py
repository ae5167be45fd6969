"""Time training steps of ParallelEngine under a layout.

    torchrun --nproc-per-node 8 benchmarks/parallel_step.py --tp 2 --pp 2 --schedule 1f1b --microbatches 4
    python benchmarks/parallel_step.py            # single process

Prints the mean step time (after warm-up), tokens/s and peak memory (CUDA) on rank 0.
"""
from __future__ import annotations

import argparse
import time

import torch

from megatron_phi4.config import ParallelConfig, model_preset
from megatron_phi4.distributed import init_distributed
from megatron_phi4.engine import ParallelEngine
from megatron_phi4.losses import LMLoss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--virtual-stages", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--recompute", default="none")
    ap.add_argument("--dp-shard", default="fsdp")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(1)
    cfg = model_preset(args.preset, num_layers=args.layers)
    pcfg = ParallelConfig(tp=args.tp, pp=args.pp, pp_schedule=args.schedule, virtual_stages=args.virtual_stages,
                          sequence_parallel=args.sp, recompute=args.recompute, dp_shard=args.dp_shard)
    dims = init_distributed(pcfg, cfg)
    engine = ParallelEngine(cfg, pcfg, dims, seed=0)
    opt = torch.optim.AdamW(engine.parameters(), lr=1e-4)
    loss_fn = LMLoss()
    g = torch.Generator().manual_seed(dims.dp_rank)
    times = []
    for step in range(args.warmup + args.steps):
        mbs = []
        for _ in range(args.microbatches):
            ids = torch.randint(0, cfg.vocab_size, (args.mbs, args.seq + 1), generator=g)
            mbs.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = engine.forward_backward(mbs, loss_fn, engine.global_units(mbs, loss_fn))
        engine.clip_grad_norm_(1.0)
        opt.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    if dims.rank == 0:
        dt = sum(times) / len(times)
        tokens = args.microbatches * args.mbs * args.seq * dims.dp
        mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else ""
        print(f"layout tp{dims.tp} pp{dims.pp} dp{dims.dp} ({args.schedule}, sp={args.sp}, recompute={args.recompute}): "
              f"{dt * 1000:.1f} ms/step, {tokens / dt:,.0f} tokens/s, loss {out['loss']:.4f}{mem}")


if __name__ == "__main__":
    main()
