"""FP8 vs bf16 time of one Phi-4-shaped linear layer (forward + backward), local backend.

Prints, for the MLP's down projection (17920 -> 5120) and the fused QKV width (5120 -> 7680) at
``--tokens`` tokens: milliseconds per forward+backward in bf16 (``F.linear``), and through the local
backend's FP8 linear (layers/float8.py: torchao's casts and ``torch._scaled_mm``) for each torchao
recipe, eager (no torch.compile: the casts are separate kernels, so eager FP8 can be slower than bf16;
that is the honest eager figure), with the ratio to bf16. CUDA only; on CPU it prints one tiny
shape so the script is exercised.

    python benchmarks/fp8_linear.py [--tokens 8192] [--iters 20]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from megatron_phi4.config import FP8Config
from megatron_phi4.distributed.tensor_parallel import RowParallelLinear
from megatron_phi4.layers.float8 import convert_to_float8


def _time(fn, iters, cuda):
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each layer (fuses the amax/scale/cast kernels); also times torchao's own "
                         "Float8Linear as the library baseline")
    ap.add_argument("--shapes", default=None, help="comma list of IN:OUT (default: 17920:5120,5120:7680)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = [(17920, 5120), (5120, 7680)] if cuda else [(256, 128)]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
    wrap = torch.compile if args.compile else (lambda m: m)
    tokens = args.tokens if cuda else 64
    print(f"device={torch.cuda.get_device_name() if cuda else 'cpu'} torch={torch.__version__} tokens={tokens}")
    for k, n in shapes:
        x = torch.randn(tokens, k, device=dev, dtype=dtype, requires_grad=True)
        g = torch.randn(tokens, n, device=dev, dtype=dtype)
        w = torch.randn(n, k, device=dev, dtype=dtype, requires_grad=True)
        plain = wrap(torch.nn.Linear(k, n, bias=False, device=dev, dtype=dtype))
        base = _time(lambda: plain(x).backward(g), args.iters, cuda)
        flops = 6 * tokens * k * n
        mode = "compiled" if args.compile else "eager"
        print(f"  {k}->{n} {mode}: bf16 {base:.3f} ms ({flops / base / 1e9:.0f} TFLOP/s)")
        for recipe in ("tensorwise", "rowwise"):
            lin = RowParallelLinear(k, n, None, device=dev, dtype=dtype)
            lin = wrap(convert_to_float8(lin, FP8Config(enabled=True, recipe=recipe)))
            ms = _time(lambda: lin(x).backward(g), args.iters, cuda)
            print(f"  {k}->{n} {mode}: fp8 {recipe:<10} {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s)  "
                  f"x{base / ms:.2f} vs bf16")
            if args.compile:  # the library's own module, same recipe: the baseline our TP-aware linear must match
                from torchao.float8 import Float8LinearConfig, convert_to_float8_training

                ref = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False, device=dev, dtype=dtype))
                ref = wrap(convert_to_float8_training(ref, config=Float8LinearConfig.from_recipe_name(recipe)))
                ms = _time(lambda: ref(x).backward(g), args.iters, cuda)
                print(f"  {k}->{n} {mode}: torchao Float8Linear {recipe:<10} {ms:.3f} ms "
                      f"({flops / ms / 1e9:.0f} TFLOP/s)  x{base / ms:.2f} vs bf16")


if __name__ == "__main__":
    main()
