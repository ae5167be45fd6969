"""Measured training throughput on one device: tokens/s, TFLOP/s, MFU and peak memory per backend
and precision, on the Phi-4 layer shapes.

    python benchmarks/throughput.py --seq 4096 --out thr.jsonl       # one GPU; layers: as many as fit
    python benchmarks/throughput.py --seq 16384 --layers 6
    python benchmarks/throughput.py --tiny                           # CPU smoke run (tests run it)

Model: hidden 5120, 40 query / 10 KV heads (head_dim 128), SwiGLU FFN 17920, vocabulary 100352 --
Phi-4's shapes -- with ``--layers`` decoder layers (default ``auto``: as many as the free device
memory holds for the hungriest configuration, from the estimate in ``auto_layers``; every row of a
run uses the same count, so the rows compare). One training step = ``--microbatches`` micro-batches
of ``--mbs`` x seq random tokens, forward + backward through ``ParallelEngine`` (one process, DP=1),
gradient clipping and the fused AdamW step of the trainer's optimizer: what the trainer runs per
step, data loading aside.

Rows (``ROWS``, in the order they run): the local backend in bf16 through FSDP2's mixed-precision
policy, eager and ``torch.compile``d per block; the same compiled with FP8 on (``model.fp8``: the
trainer's switch, torchao's float8 recipe ``--local-fp8-recipe`` on every decoder linear, embedding
and LM head in bf16); bf16 through autocast (``dp_shard: none``), compiled; and the Transformer
Engine backend in bf16 and FP8 (``--te-fp8-recipe``) where TE is installed. A row that cannot run
here is printed with the reason, never estimated.

Figures, per row (warm-up steps excluded; the device is synchronized around every timed step; the
median step time is reported):

* tokens/s/GPU = micro-batches x mbs x seq / step time;
* TFLOP/s/GPU = tokens/s x ``flops_per_token(cfg, seq, causal=True)`` -- Megatron-LM's
  ``num_floating_point_operations`` (megatron-core 0.16): 6 x matmul parameters (LM head included)
  + 6 x layers x heads x head_dim x seq, i.e. causal attention counted as half the score matrix.
  The trainer's log uses the PaLM convention (12 L H T, the full matrix), which reads higher;
* MFU against the bf16 matrix-multiply rate *measured in the same process* (the best of a few
  large ``torch.matmul`` shapes on random data: the strongest honest baseline), and against the
  datasheet's dense bf16 peak (``PEAK_TFLOPS_BY_NAME``). FP8 rows are also divided by the bf16
  peaks, as Megatron/NeMo report them; the measured FP8 matmul rate is printed for context;
* peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps (CPU: peak RSS).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_phi4.config import FP8Config, ModelConfig, OptimizerConfig, ParallelConfig, model_preset  # noqa: E402
from megatron_phi4.training.metrics import PEAK_TFLOPS_BY_NAME, flops_per_token  # noqa: E402

PHI4_SHAPE = dict(hidden_size=5120, num_attention_heads=40, num_kv_heads=10, intermediate_size=17920,
                  vocab_size=100352, max_seq_length=16384)


@dataclass(frozen=True)
class Row:
    name: str
    backend: str  # model.backend
    precision: str  # bf16 | fp8 (model.fp8 on: torchao on local, TE's recipes on te)
    dp_shard: str  # fsdp: bf16 through FSDP2's policy; none: through autocast
    compile: bool


# In the order they run (what matters most first, when a time budget cuts the list short): the eager
# bf16 baseline, the compiled bf16 row and its FP8 twin, bf16 through autocast, then TE.
ROWS = [
    Row("local-bf16-fsdp", "local", "bf16", "fsdp", False),
    Row("local-bf16-fsdp-compile", "local", "bf16", "fsdp", True),
    Row("local-fp8-fsdp-compile", "local", "fp8", "fsdp", True),
    Row("local-bf16-autocast-compile", "local", "bf16", "none", True),
    Row("te-bf16", "te", "bf16", "fsdp", False),
    Row("te-fp8", "te", "fp8", "fsdp", False),
]
# FP8 speed-up pairs: (fp8 row, the bf16 row with the same mechanism)
PAIRS = [("local-fp8-fsdp-compile", "local-bf16-fsdp-compile"), ("te-fp8", "te-bf16")]


# ---------------------------------------------------------------------------------------------- device
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def datasheet_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS_BY_NAME.items() if k in name), None)


def measured_matmul_peak(device: torch.device, tiny: bool) -> dict:
    """Best TFLOP/s of ``torch.matmul`` over a few shapes on random data (bf16 on CUDA, fp32 on CPU):
    three input sets rotated (no cache reuse), warm-up first, the median of timed repeats."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(256, 256, 256)] if tiny or device.type != "cuda" else \
        [(8192, 8192, 8192), (4096, 5120, 17920), (16384, 5120, 5120)]
    best, per_shape = 0.0, {}
    for m, k, n in shapes:
        sets = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
                for _ in range(3)]
        for a, b in sets:  # warm-up: cuBLAS heuristics, clocks
            torch.matmul(a, b)
        times = []
        for _ in range(5 if device.type == "cuda" else 2):
            sync(device)
            t0 = time.perf_counter()
            for i in range(10):
                a, b = sets[i % 3]
                torch.matmul(a, b)
            sync(device)
            times.append((time.perf_counter() - t0) / 10)
        tflops = 2 * m * k * n / statistics.median(times) / 1e12
        per_shape[f"{m}x{k}x{n}"] = round(tflops, 1)
        best = max(best, tflops)
        del sets
    out = {"dtype": str(dtype).replace("torch.", ""), "tflops": best, "per_shape": per_shape}
    fp8 = measured_fp8_matmul(device) if device.type == "cuda" and not tiny else None
    if fp8 is not None:
        out["fp8_tflops"] = fp8
    return out


def measured_fp8_matmul(device: torch.device) -> float | None:
    """e4m3 x e4m3 -> bf16 ``torch._scaled_mm`` (tensor-wise scales) at 8192^3, for context."""
    if torch.cuda.get_device_capability(device) < (8, 9):
        return None
    try:
        m = k = n = 8192
        a = torch.randn(m, k, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device=device).to(torch.float8_e4m3fn).t()  # column-major, as cuBLAS wants
        one = torch.ones((), device=device)
        for _ in range(3):
            torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        times = []
        for _ in range(5):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(10):
                torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            sync(device)
            times.append((time.perf_counter() - t0) / 10)
        return 2 * m * k * n / statistics.median(times) / 1e12
    except Exception as e:  # noqa: BLE001 - context only
        print(f"fp8 matmul rate not measured: {type(e).__name__}: {e}", flush=True)
        return None


# ---------------------------------------------------------------------------------------------- rows
def unavailable(row: Row, device: torch.device) -> str | None:
    """Why ``row`` cannot run here (None: it can)."""
    from megatron_phi4 import registry

    if row.backend not in registry.BACKENDS.names():
        return f"no {row.backend!r} layer backend in this build (registered: {', '.join(registry.BACKENDS.names())})"
    reason = registry.BACKENDS.unavailable_reason(row.backend)
    if reason is not None:
        return reason
    if row.precision == "fp8":
        if row.backend == "local" and importlib.util.find_spec("torchao") is None:
            return "FP8 on the local backend uses torchao, which is not installed"
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            return "FP8 matrix multiplies need compute capability 8.9+ (Ada, Hopper, Blackwell)"
    return None


@torch.no_grad()
def fill_parameters(engine, std: float = 0.02) -> None:
    """Random N(0, std) weights (norm weights one) drawn on the device: drawing billions of values on
    the host would take minutes; values only need to be realistic, not reproducible."""
    gen = torch.Generator(device=engine.device).manual_seed(0)
    for name, p in engine.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if "norm" in name:
            local.fill_(1.0)
        else:
            local.normal_(0.0, std, generator=gen)


def model_config(args, layers: int, row: Row) -> ModelConfig:
    cfg = model_preset("tiny", num_layers=layers) if args.tiny else ModelConfig(num_layers=layers, **PHI4_SHAPE)
    cfg.backend = row.backend
    if row.precision == "fp8":
        recipe = args.local_fp8_recipe if row.backend == "local" else args.te_fp8_recipe
        cfg.fp8 = FP8Config(enabled=True, recipe=recipe)
    cfg.validate()
    return cfg


def auto_layers(seq: int, mbs: int, device: torch.device) -> int:
    """Decoder layers that fit 85 % of the free device memory in the hungriest row. Per layer: 20
    bytes per parameter (fp32 weight and gradient, two Adam moments, and FSDP's unsharded fp32
    gradient accumulated across micro-batches -- or autocast's cached bf16 weight copies) plus
    ``mbs x seq x (32 h + 8 ffn)`` bytes of activations saved for backward (measured with saved-tensor
    hooks on a scaled-down model: about 30 KB per token and layer at h=512, ffn=1792, autocast).
    Fixed: embedding and LM head (20 bytes per parameter each), the logits path (bf16 logits, fp32
    log-softmax and its gradient: about 14 bytes x vocab per token) and 2 GiB of workspace. An
    estimate: a row that still runs out of memory is retried once with two thirds of the layers."""
    free, _ = torch.cuda.mem_get_info(device)
    cfg = ModelConfig(num_layers=1, **PHI4_SHAPE)
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_kv_heads * cfg.head_dim
    layer_params = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    tokens = mbs * seq
    per_layer = 20 * layer_params + tokens * (32 * h + 8 * f)
    fixed = 20 * 2 * v * h + 14 * v * tokens + (2 << 30)
    return max(1, int((0.85 * free - fixed) // per_layer))


def run_row(row: Row, args, seq: int, layers: int, device: torch.device, dims_cache: dict) -> dict:
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.losses import LMLoss
    from megatron_phi4.training.optimizer import build_optimizer

    cfg = model_config(args, layers, row)
    pcfg = ParallelConfig(dp_shard=row.dp_shard, mixed_precision="bf16", compile=row.compile,
                          compile_backend=args.compile_backend)
    key = row.dp_shard
    if key not in dims_cache:
        dims_cache[key] = ParallelDims.build(pcfg, device=device, model_cfg=cfg)
    t_build = time.perf_counter()
    engine = ParallelEngine(cfg, pcfg, dims_cache[key], seed=None, device=device)
    fill_parameters(engine)
    extra = {"fp8_recipe": cfg.fp8.recipe} if cfg.fp8.enabled else {}
    if cfg.fp8.enabled and row.backend == "local":
        from megatron_phi4.layers.float8 import Float8ColumnParallelLinear, Float8RowParallelLinear

        fp8_types = (Float8ColumnParallelLinear, Float8RowParallelLinear)
        extra["fp8_linears"] = sum(isinstance(m, fp8_types) for part in engine.model_parts for m in part.modules())
    optimizer = build_optimizer(engine, OptimizerConfig(lr=1e-5, weight_decay=0.1))
    extra["fused_adamw"] = bool(optimizer.defaults.get("fused"))
    loss_fn = LMLoss()
    gen = torch.Generator(device="cpu").manual_seed(1)
    data = []  # on the device before timing: no host copies in the timed steps
    for _ in range(args.microbatches):
        ids = torch.randint(0, cfg.vocab_size, (args.mbs, seq + 1), generator=gen)
        data.append({"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device)})
    units = engine.global_units(data, loss_fn)
    sync(device)
    extra["build_s"] = round(time.perf_counter() - t_build, 2)
    times, loss = [], float("nan")
    first_step_s = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = engine.forward_backward(data, loss_fn, units)
        engine.clip_grad_norm_(1.0)
        optimizer.step()
        sync(device)
        dt = time.perf_counter() - t0
        if step == 0:
            first_step_s = dt  # compile and cuBLAS/cuDNN start-up live here: never timed
        if step >= args.warmup:
            times.append(dt)
        loss = out["loss"]
    step_s = statistics.median(times)
    tokens = args.microbatches * args.mbs * seq
    tokens_per_s = tokens / step_s
    flops = flops_per_token(cfg, seq, causal=True)
    tflops = tokens_per_s * flops / 1e12
    if device.type == "cuda":
        peak_mem_gb = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        peak_mem_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "row": row.name, "backend": row.backend, "precision": row.precision, "dp_shard": row.dp_shard,
        "compile": row.compile, "seq": seq, "layers": layers, "mbs": args.mbs, "microbatches": args.microbatches,
        "step_s": step_s, "step_s_min": min(times), "step_s_max": max(times), "first_step_s": first_step_s,
        "tokens_per_s": tokens_per_s, "tflops": tflops, "flops_per_token": flops,
        "peak_mem_gb": peak_mem_gb, "loss": loss, **extra,
    }
    del engine, optimizer, data, out
    return result


def free_memory(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- main
def environment(device: torch.device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   cudnn=torch.backends.cudnn.version())
    for pkg in ("torchao", "transformer_engine"):
        spec = importlib.util.find_spec(pkg)
        if spec is not None:
            try:
                from importlib.metadata import version

                env[pkg] = version(pkg)
            except Exception:  # noqa: BLE001
                env[pkg] = "installed"
    return env


def init_process_group(device: torch.device) -> None:
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)


def fmt_table(results: list[dict], peak: dict, sheet: float | None) -> str:
    lines = ["| row | seq | layers | tokens/s/GPU | TFLOP/s/GPU | MFU (measured peak) | MFU (datasheet) | "
             "peak mem GB | step s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['row']} | {r.get('seq', '')} | | not measured: {r['skipped']} | | | | | |")
            continue
        mfu_sheet = f"{r['tflops'] / sheet:.1%}" if sheet else "n/a"
        lines.append(f"| {r['row']} | {r['seq']} | {r['layers']} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | "
                     f"{r['tflops'] / peak['tflops']:.1%} | {mfu_sheet} | {r['peak_mem_gb']:.1f} | {r['step_s']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model, short sequences: a CPU smoke run")
    ap.add_argument("--seq", type=int, nargs="+", help="sequence lengths (default 4096 16384; tiny: 64 128)")
    ap.add_argument("--layers", default="auto", help="decoder layers, or 'auto' (as many as fit; GPU only)")
    ap.add_argument("--mbs", type=int, default=1, help="micro-batch size")
    ap.add_argument("--microbatches", type=int, default=None, help="micro-batches per step (default 4; tiny 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 4; tiny 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    ap.add_argument("--rows", default="all", help=f"comma-separated subset of: {', '.join(r.name for r in ROWS)}")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; CPU aot_eager)")
    ap.add_argument("--local-fp8-recipe", default="tensorwise", help="model.fp8.recipe of the local FP8 rows")
    ap.add_argument("--te-fp8-recipe", default="delayed", help="model.fp8.recipe of the TE FP8 rows")
    ap.add_argument("--budget-s", type=float, default=0.0, help="start no new row after this many seconds (0: no limit)")
    ap.add_argument("--out", default=None, help="append one JSON line per row (and a header line) to this file")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
    args.seq = args.seq or ([64, 128] if args.tiny else [4096, 16384])
    args.microbatches = args.microbatches or (2 if args.tiny else 4)
    args.steps = args.steps or (2 if args.tiny else 4)
    args.compile_backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    wanted = [r.name for r in ROWS] if args.rows == "all" else [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {r.name for r in ROWS})
    if unknown:
        ap.error(f"--rows: unknown {unknown}; known: {', '.join(r.name for r in ROWS)}")
    if args.layers == "auto" and device.type != "cuda" and not args.tiny:
        ap.error("--layers auto needs a CUDA device; give a number")
    rows = [r for r in ROWS if r.name in wanted]

    init_process_group(device)
    env = environment(device)
    peak = measured_matmul_peak(device, args.tiny)
    sheet = datasheet_peak(device)
    header = {"kind": "header", **env, "matmul_peak": peak, "datasheet_peak_tflops": sheet,
              "flop_formula": "megatron causal: 6*matmul_params + 6*L*H*T per token", "args": vars(args)}
    print(json.dumps(header), flush=True)
    out_file = open(args.out, "a") if args.out else None
    if out_file:
        out_file.write(json.dumps(header) + "\n")
        out_file.flush()

    results, dims_cache = [], {}
    for seq in args.seq:
        if args.tiny:
            layers = 2 if args.layers == "auto" else int(args.layers)
        else:
            layers = auto_layers(seq, args.mbs, device) if args.layers == "auto" else int(args.layers)
        for row in rows:
            reason = unavailable(row, device)
            if reason is None and args.budget_s and time.perf_counter() - t_start > args.budget_s:
                reason = f"time budget of {args.budget_s:.0f} s used up before this row"
            if reason is not None:
                result = {"row": row.name, "seq": seq, "skipped": reason}
            else:
                result = None
                for attempt_layers in (layers, max(1, layers * 2 // 3)):
                    try:
                        result = run_row(row, args, seq, attempt_layers, device, dims_cache)
                        break
                    except torch.OutOfMemoryError:
                        oom = f"out of memory with {attempt_layers} layers"
                    except Exception as e:  # noqa: BLE001 - one broken row must not hide the others
                        oom = None
                        result = {"row": row.name, "seq": seq, "skipped": f"failed: {type(e).__name__}: {e}"[:500]}
                        import traceback

                        traceback.print_exc()
                        break
                    finally:
                        free_memory(device)
                    print(f"{row.name} seq {seq}: {oom}, retrying with fewer layers", flush=True)
                if result is None:
                    result = {"row": row.name, "seq": seq, "skipped": oom}
            if "skipped" not in result:
                result["mfu_measured_peak"] = result["tflops"] / peak["tflops"]
                result["mfu_datasheet"] = result["tflops"] / sheet if sheet else None
            results.append(result)
            print(json.dumps(result), flush=True)
            if out_file:
                out_file.write(json.dumps(result) + "\n")
                out_file.flush()

    by = {(r["row"], r["seq"]): r for r in results if "skipped" not in r}
    ratios = []
    for fp8, bf16 in PAIRS:
        for seq in args.seq:
            if (fp8, seq) in by and (bf16, seq) in by:
                ratios.append(f"{fp8} / {bf16} at seq {seq}: "
                              f"{by[(fp8, seq)]['tokens_per_s'] / by[(bf16, seq)]['tokens_per_s']:.2f}x tokens/s")
    print(f"\n{env.get('gpu', 'CPU')} | torch {env['torch']} | CUDA {env.get('cuda')} | {env['date']}")
    extra = f", FP8 e4m3 matmul {peak['fp8_tflops']:.0f} TFLOP/s" if peak.get("fp8_tflops") else ""
    print(f"measured {peak['dtype']} matmul peak {peak['tflops']:.1f} TFLOP/s {peak['per_shape']}{extra}; "
          f"datasheet dense bf16 {sheet or 'n/a'} TFLOP/s; FLOPs: Megatron causal formula")
    print(fmt_table(results, peak, sheet))
    for line in ratios:
        print(line)
    if out_file:
        out_file.close()
    return results


if __name__ == "__main__":
    main()
