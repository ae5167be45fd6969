"""The machine the planner predicts for: rates and sizes, every one a command-line flag.

Defaults describe an H100 SXM 80 GB cluster (8 GPUs per node, NVLink 4 + NVSwitch inside a node,
one 400 Gb/s InfiniBand NIC per GPU). Which numbers are datasheet values and which were measured
is said next to each; docs/planner.md has the measurements and the commands that produced them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Hardware:
    # Dense bf16 GEMM rate reached by Phi-4's projection shapes (4096 tokens x 5120 x 17920 ...),
    # forward + backward. Measured on an H200 (same GH100 compute die, clocks and 700 W limit as the
    # H100 SXM; the H200 adds HBM only): 789 TFLOP/s at tp 1, 717 at tp 2, 785 for an 8192^3 GEMM
    # (docs/planner.md); the datasheet peak is 989.
    matmul_tflops: float = 750.0
    # Causal flash attention (SDPA with GQA, as the model calls it), forward + backward, FLOPs counted
    # for the causal half. None: the H200 measurement for the sequence length (411 TFLOP/s at 4K,
    # 582 at 16K with 40 heads; log-linear between, clamped), see ``attention_rate``.
    attention_tflops: float | None = None
    # fp32 layouts: the engine does not enable TF32, so fp32 matmuls run on the CUDA cores
    # (H100 SXM datasheet: 67 TFLOP/s fp32; ~80% of it is assumed reachable).
    fp32_matmul_tflops: float = 50.0
    hbm_gb_per_s: float = 3350.0  # GB/s, H100 SXM datasheet HBM3 bandwidth (memory-bound kernels, optimizer)
    nvlink_gb_per_s: float = 360.0  # GB/s achieved NCCL bus bandwidth inside a node (datasheet 450 per direction)
    ib_gb_per_s: float = 45.0  # GB/s per GPU across nodes (one 400 Gb/s = 50 GB/s NIC per GPU, ~90% achieved)
    # Latency: NCCL runs all-gather / reduce-scatter as a ring of (ranks - 1) steps (all-reduce 2x),
    # each step paying a hop latency - the slowest hop, InfiniBand, once the ring leaves the node -
    # plus a launch cost per collective. Estimates (small-message nccl-tests times / ring steps).
    launch_latency_us: float = 10.0
    nvlink_step_latency_us: float = 2.0
    ib_step_latency_us: float = 6.0
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    reserve_gib: float = 3.0  # CUDA context, NCCL communicators and their buffers
    fragmentation: float = 0.05  # caching-allocator overhead, as a fraction of what is allocated
    peak_tflops: float = 989.0  # for MFU only (H100 SXM dense bf16 datasheet)
    overlap_dp: bool = True  # FSDP's all-gathers / reduce-scatters overlap compute (see timing.py)

    def attention_rate(self, seq: int) -> float:
        """TFLOP/s of causal attention at ``seq`` (the flag, or the measured curve)."""
        if self.attention_tflops is not None:
            return self.attention_tflops
        lo, hi = MEASURED_ATTENTION_TFLOPS[0], MEASURED_ATTENTION_TFLOPS[-1]
        if seq <= lo[0]:
            return lo[1]
        if seq >= hi[0]:
            return hi[1]
        x = (math.log2(seq) - math.log2(lo[0])) / (math.log2(hi[0]) - math.log2(lo[0]))
        return lo[1] + x * (hi[1] - lo[1])

    def as_dict(self) -> dict:
        return asdict(self)


# (sequence length, TFLOP/s) of causal GQA flash attention fwd+bwd, 40 query / 10 KV heads of 128,
# measured on an H200 with torch 2.11 (benchmarks/results/planner_calibration_h200.json).
MEASURED_ATTENTION_TFLOPS = ((4096, 411.0), (16384, 582.0))
