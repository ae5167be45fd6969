"""What a run reports: TensorBoard scalars, a machine-readable ``metrics.jsonl`` and one console
line per log interval, plus the FLOP and memory arithmetic behind throughput and MFU.

Only the main rank writes (``enabled=True``); on the others every method is a no-op, so call sites
need no rank checks. Steps are numbered per stage in the JSON lines and by a run-wide
``global_step`` in TensorBoard, so a later stage never overwrites an earlier one's curves.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from megatron_phi4.config import ModelConfig

# Dense bf16 peak TFLOP/s per device by NVIDIA's datasheets (the sparse figure halved), for MFU when the
# recipe does not set logging.peak_tflops. First match wins: the PCIe/NVL parts before the SXM ones.
PEAK_TFLOPS_BY_NAME = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0,
                       "H200": 989.0, "H100": 989.0, "A100": 312.0}


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matrix multiply per token: every linear layer and the LM head
    (the embedding is a lookup, and norms are elementwise)."""
    h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    attn = h * h + 2 * h * kv + h * h  # q, k, v, o
    mlp = 3 * h * cfg.intermediate_size  # gate, up, down
    return cfg.num_layers * (attn + mlp) + h * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_length: int, causal: bool = False) -> float:
    """Training FLOPs per token, forward + backward (3 matrix multiplies per weight, 2 FLOPs per
    multiply-add): ``6 N + 12 L H T`` with N the matmul parameters (``matmul_params``: every linear
    layer and the LM head), L layers, H = heads x head_dim and T the sequence length.

    ``causal=False`` (the trainer's figure): the PaLM convention (Chowdhery et al. 2022, appendix B),
    which counts the whole ``T x T`` score matrix of ``Q K^T`` and of ``(Q K^T) V``.
    ``causal=True``: Megatron-LM's convention (``num_floating_point_operations`` in
    megatron/training/training.py, megatron-core 0.15 and 0.16): only the lower triangle is counted
    ("causal mask (only half of the mask is non-zero)"), so the attention term is ``6 L H T``;
    the rest is the same formula (GQA's narrower K/V projections and SwiGLU's three MLP matrices are
    in N, the logit layer too). ``benchmarks/throughput.py`` reports this one, to compare with
    Megatron's MFU figures; causal=True gives the lower of the two numbers."""
    attention = (6 if causal else 12) * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * seq_length
    return float(6 * matmul_params(cfg) + attention)


def default_peak_tflops(device: torch.device | str | None = None) -> float:
    """Peak dense bf16 TFLOP/s of the CUDA device by name; 0 (MFU disabled) on CPU or unknown GPUs."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS_BY_NAME.items() if k in name), 0.0)


def throughput_metrics(tokens: int, seconds: float, cfg: ModelConfig, seq_length: int,
                       world_size: int, peak_tflops: float) -> dict[str, float]:
    """tokens/s over the whole job, achieved TFLOP/s per device and MFU (0 when the peak is unknown)."""
    seconds = max(seconds, 1e-9)
    tflops = tokens * flops_per_token(cfg, seq_length) / seconds / world_size / 1e12
    return {"tokens_per_s": tokens / seconds, "tflops_per_device": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else 0.0}


def memory_metrics(device: torch.device | str) -> dict[str, float]:
    """GPU allocator figures on CUDA; the process's resident and peak resident memory on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        gb = 1024**3
        return {"mem/allocated_gb": torch.cuda.memory_allocated(device) / gb,
                "mem/max_allocated_gb": torch.cuda.max_memory_allocated(device) / gb,
                "mem/reserved_gb": torch.cuda.memory_reserved(device) / gb}
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    out = {"mem/max_rss_gb": peak_kb / 1024**2}
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        out["mem/rss_gb"] = pages * resource.getpagesize() / 1024**3
    except OSError:
        pass
    return out


class StepTimer:
    """Wall-clock seconds per step; ``lap()`` returns the time since the previous lap."""

    def __init__(self):
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        return dt


def _fmt_console(stage: str, step: int, s: dict[str, float], total_steps: int | None) -> str:
    parts = [f"[{stage}] step {step}" + (f"/{total_steps}" if total_steps else "")]
    fields = (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "grad {:.3f}"),
              ("tokens_per_s", "{:,.0f} tok/s"), ("tflops_per_device", "{:.2f} TFLOP/s/dev"),
              ("mfu", "MFU {:.1%}"), ("mem/max_allocated_gb", "mem {:.1f} GB"), ("mem/max_rss_gb", "rss {:.2f} GB"),
              ("skipped_steps", "skipped {:.0f}"))
    parts += [fmt.format(s[k]) for k, fmt in fields if k in s and s[k] is not None]
    return " | ".join(parts)


class MetricsLogger:
    def __init__(self, run_dir, enabled: bool, tensorboard: bool = True, jsonl: bool = True,
                 log_interval: int = 1, console: Callable[[str], None] | None = None):
        self.enabled, self.log_interval = enabled, max(1, log_interval)
        self.console = console or (lambda line: print(line, flush=True))
        self.global_step = 0
        self._writer = self._jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if jsonl:
            path = run_dir / "metrics.jsonl"
            torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
            self._jsonl = open(path, "a")
            if torn:  # a killed run's half line: end it so the resumed run's rows stay parseable
                self._jsonl.write("\n")

    def _record(self, kind: str, stage: str, step: int, scalars: dict[str, float]) -> None:
        if self._jsonl is not None:
            row = {"kind": kind, "stage": stage, "step": step, "global_step": self.global_step,
                   "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._writer is not None:
            prefix = "train" if kind == "train" else "val"
            for name, value in scalars.items():
                self._writer.add_scalar(f"{prefix}/{name}", float(value), self.global_step)
            self._writer.flush()

    def log_step(self, stage: str, step: int, scalars: dict[str, float], global_step: int | None = None,
                 total_steps: int | None = None) -> None:
        """``global_step``: the run-wide step (the trainer passes it so a resumed run continues the
        curves); default: one more than the last."""
        self.global_step = self.global_step + 1 if global_step is None else global_step
        if not self.enabled:
            return
        self._record("train", stage, step, scalars)
        if step % self.log_interval == 0:
            self.console(_fmt_console(stage, step, scalars, total_steps))

    def log_eval(self, stage: str, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._record("eval", stage, step, scalars)
        self.console(f"[{stage}] eval at step {step} | " +
                     " | ".join(f"{k} {v:.4f}" for k, v in scalars.items()))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def read_metrics(path) -> list[dict]:
    """Rows of a metrics.jsonl. A torn line (a run killed mid-write) is skipped with a warning."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{i}: ignoring a torn line", file=sys.stderr)
    return rows
