"""LM head + log p(labels), forward + backward: whole logits then an fp32 log-softmax (this project's
path before the chunked head) against ``chunked_head_log_probs`` (the head fused into a chunked
log-softmax that recomputes each chunk in backward). Prints time, peak memory and the largest
difference of values and gradients, for each chunk size asked.

Memory on CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the step. On CPU
only times are printed (``step_memory.py`` measures CPU memory, per process).

    python benchmarks/head_log_probs.py                                  # CPU, small shapes
    python benchmarks/head_log_probs.py --device cuda --tokens 16384 --hidden 5120 --vocab 100352
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_phi4.distributed.vocab_parallel import chunked_head_log_probs  # noqa: E402
from megatron_phi4.losses.base import token_log_probs  # noqa: E402


def whole_logits(x, w, targets, chunk=None):
    return token_log_probs(x @ w.t(), targets)


def chunked(x, w, targets, chunk):
    return chunked_head_log_probs(x, w, targets, chunk_tokens=chunk)


def measure(fn, x, w, targets, upstream, chunk, iters):
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    cuda = x.device.type == "cuda"

    def step():
        xl.grad = wl.grad = None
        out = fn(xl, wl, targets, chunk)
        (out * upstream).sum().backward()
        return out

    step()
    xl.grad = wl.grad = None  # the base must not hold the warm-up's gradients (freed in the next step)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return (out.detach(), xl.grad, wl.grad), statistics.median(times) * 1e3, peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="bf16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=100352)
    p.add_argument("--chunks", default="1024,4096")
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype)
    w = (torch.randn(args.vocab, args.hidden, generator=g) * args.hidden ** -0.5).to(device, dtype)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    upstream = torch.randn(args.tokens, generator=g).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {name}, {dtype}, tokens {args.tokens}, hidden {args.hidden}, "
          f"vocab {args.vocab}")
    print(f"{'path':<16} {'fwd+bwd ms':>11} {'peak MiB':>10} {'logp err':>9} {'dx err':>9} {'dW err':>9}")
    ref, ms0, peak0 = measure(whole_logits, x, w, targets, upstream, None, args.iters)
    print(f"{'whole logits':<16} {ms0:>11.2f} {peak0:>10.1f}")
    for chunk in (int(c) for c in args.chunks.split(",")):
        got, ms, peak = measure(chunked, x, w, targets, upstream, chunk, args.iters)
        errs = [float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(got, ref)]
        ratios = f"   time {ms / ms0:.2f}x" + (f", memory {peak / peak0:.3f}x" if peak0 == peak0 else "")
        print(f"{'chunk ' + str(chunk):<16} {ms:>11.2f} {peak:>10.1f} " + " ".join(f"{e:>9.1e}" for e in errs) + ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
