"""Measure what the layout planner assumes, on one GPU, and compare with its predictions.

    python benchmarks/planner_calibration.py [--layers 4] [--seqs 4096,16384] [--json out.json]

1. **matmul rate** for Phi-4's projection shapes: forward + backward of every linear of a decoder
   block (q, k, v, o, gate, up, down) and of the LM head, bf16, 4096 tokens, at tp = 1 and 2 (the
   shapes a TP rank runs); baseline: an 8192^3 bf16 GEMM in the same process (the strongest
   honest GEMM rate of the device).
2. **attention rate**: ``scaled_dot_product_attention`` causal with GQA as the model calls it,
   forward + backward, FLOPs counted for the causal half (the planner's convention).
3. **a real model slice**: Phi-4's width, vocabulary and attention with ``--layers`` decoder
   layers, bf16, one micro-batch of 1 x seq, recompute none / selective / full: the measured peak
   memory above the steady state (parameters and gradients allocated) against the planner's
   ``single_device_activation_peak``, and the measured forward + backward time against
   ``timing.chunk_time`` fed with the rates measured in 1 and 2 and the device's HBM bandwidth.

Prints a table and writes every number to ``--json``. Runs on CPU too (``--device cpu --tiny``)
as a smoke test; the figures that matter come from a GPU. The H200 run behind the planner's
defaults is in ``benchmarks/results/planner_calibration_h200.{json,log}`` (docs/planner.md); it
was made at commit c95ce39, before the LM head was fused with the loss (the slice then returned
whole logits and the loss upcast them): its memory rows measured that older head, not this one.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, warmup=2, reps=5) -> float:
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def linear_rate(shapes, tokens, dev, dtype) -> tuple[float, float]:
    """(TFLOP/s, seconds) of forward + backward through linears of (in, out) shapes."""
    ws = [torch.randn(o, i, device=dev, dtype=dtype, requires_grad=True) for i, o in shapes]
    xs = [torch.randn(tokens, i, device=dev, dtype=dtype, requires_grad=True) for i, _ in shapes]

    def run():
        for x, w in zip(xs, ws):
            y = F.linear(x, w)
            y.backward(torch.ones_like(y))

    t = timed(run, dev)
    flops = sum(6.0 * tokens * i * o for i, o in shapes)
    return flops / t / 1e12, t


def gemm_baseline(dev, dtype, n=8192) -> float:
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    t = timed(lambda: a @ b, dev, warmup=3, reps=10)
    return 2.0 * n ** 3 / t / 1e12


def attention_rate(seq, heads, kv_heads, head_dim, dev, dtype) -> tuple[float, float]:
    q = torch.randn(1, seq, heads, head_dim, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(1, seq, kv_heads, head_dim, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(1, seq, kv_heads, head_dim, device=dev, dtype=dtype, requires_grad=True)

    def run():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        out.backward(torch.ones_like(out))

    t = timed(run, dev)
    from megatron_phi4.planner.timing import ATTENTION_BACKWARD_FACTOR

    fwd = 2.0 * seq * seq * heads * head_dim  # causal half of QK^T and PV
    return fwd * (1 + ATTENTION_BACKWARD_FACTOR) / t / 1e12, t


def model_slice(cfg, seq, recompute, dev, dtype):
    """Measured (peak bytes above steady state, fwd+bwd seconds) of one micro-batch."""
    from megatron_phi4.distributed.recompute import apply_recompute
    from megatron_phi4.losses import LabelLogProbs, LMLoss
    from megatron_phi4.models.phi4.model import Phi4Model
    from megatron_phi4.models.spec import model_spec

    with torch.device("meta"):
        model = Phi4Model(cfg)
    model.to_empty(device=dev)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.to(dtype)
    spec = model_spec(cfg)
    apply_recompute(spec.blocks(model), recompute, spec.selective_recompute)
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), device=dev)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    loss_fn = LMLoss()

    def step():  # as the engine runs LMLoss: the head fused with the log-softmax, chunk by chunk
        out = loss_fn(LabelLogProbs(model(batch["input_ids"], labels=batch["labels"])), batch)
        (out.loss_sum / out.units).backward()

    step()
    for p in model.parameters():
        p.grad.zero_()
    _sync(dev)
    peak = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    t = timed(step, dev, warmup=1, reps=3)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return peak, t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seqs", default="4096,16384")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hbm-gb-per-s", type=float, default=4800.0, help="HBM bandwidth of this device (H200: 4800)")
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from megatron_phi4.config import model_preset
    from megatron_phi4.planner.hardware import Hardware
    from megatron_phi4.planner.layout import Layout
    from megatron_phi4.planner.memory import single_device_activation_peak
    from megatron_phi4.planner.model_shapes import rank_chunks
    from megatron_phi4.planner.timing import chunk_time

    dev, dtype = torch.device(args.device), torch.bfloat16
    cfg = model_preset("phi4-14b", num_layers=args.layers)
    if args.tiny:
        cfg = model_preset("phi4-14b", num_layers=args.layers, hidden_size=256, num_attention_heads=8,
                           num_kv_heads=2, intermediate_size=512, vocab_size=4096)
        args.tokens = 256
    seqs = [int(s) for s in args.seqs.split(",")]
    out: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                 "torch": torch.__version__, "config": {"layers": args.layers, "tokens": args.tokens}}
    print(f"device {out['device']}, torch {torch.__version__}", flush=True)

    out["gemm_8192_tflops"] = gemm_baseline(dev, dtype, 1024 if args.tiny else 8192)
    print(f"baseline: square bf16 GEMM {out['gemm_8192_tflops']:.0f} TFLOP/s", flush=True)
    h, d, f, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * d, cfg.num_kv_heads * d
    for tp in (1, 2):
        block = [(h, q // tp), (h, kv // tp), (h, kv // tp), (q // tp, h), (h, f // tp), (h, f // tp), (f // tp, h)]
        rate, _ = linear_rate(block, args.tokens, dev, dtype)
        head_rate, _ = linear_rate([(h, v // tp)], args.tokens, dev, dtype)
        out[f"block_linears_tp{tp}_tflops"], out[f"lm_head_tp{tp}_tflops"] = rate, head_rate
        print(f"tp{tp}: block linears fwd+bwd {rate:.0f} TFLOP/s ({rate / out['gemm_8192_tflops']:.2f} x baseline), "
              f"LM head {head_rate:.0f}", flush=True)
    for seq in seqs:
        for tp in (1, 2):
            rate, t = attention_rate(seq, cfg.num_attention_heads // tp, cfg.num_kv_heads // tp, d, dev, dtype)
            out[f"attention_s{seq}_tp{tp}_tflops"] = rate
            print(f"attention seq {seq} tp{tp}: {rate:.0f} TFLOP/s (causal FLOPs, fwd+bwd), {t * 1e3:.1f} ms",
                  flush=True)

    mm = out["block_linears_tp1_tflops"]
    rows = []
    for seq in seqs:
        hw = Hardware(matmul_tflops=mm, attention_tflops=out[f"attention_s{seq}_tp1_tflops"],
                      hbm_gb_per_s=args.hbm_gb_per_s)
        for rc in ("none", "selective", "full"):
            peak, t = model_slice(cfg, seq, rc, dev, dtype)
            pred = single_device_activation_peak(cfg, batch=1, seq=seq, recompute=rc, act_bytes=2, grad_bytes=2)
            layout = Layout(1, 1, 1, recompute=rc, precision="bf16")
            chunk = rank_chunks(cfg, layout, 0)[0]
            ct = chunk_time(cfg, layout, chunk, seq, hw)
            row = {"seq": seq, "recompute": rc, "measured_peak_bytes": peak, "predicted_peak_bytes": pred["total"],
                   "predicted_activations": pred["activations"], "predicted_transient": pred["transient"],
                   "measured_s": t, "predicted_s": ct.forward + ct.backward}
            rows.append(row)
            mem = (f"peak {peak / 2**30:.2f} GiB vs predicted {pred['total'] / 2**30:.2f} "
                   f"(ratio {peak / pred['total']:.3f})") if peak is not None else "peak n/a"
            print(f"slice {args.layers} layers seq {seq} {rc:9s}: {mem}; fwd+bwd {t * 1e3:.1f} ms vs predicted "
                  f"{row['predicted_s'] * 1e3:.1f} ms (ratio {t / row['predicted_s']:.3f})", flush=True)
    out["slices"] = rows
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
