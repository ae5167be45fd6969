"""Predicted step time of a layout: compute, TP/PP/DP communication and the pipeline bubble.

A model, not a measurement; every rate is a ``Hardware`` parameter. Per micro-batch and model
chunk (``chunk_time``):

* **matmuls**: ``2 N x (matmul parameters of the chunk) / tp`` FLOPs forward, twice that backward,
  at ``matmul_tflops`` (``fp32_matmul_tflops`` for fp32 layouts); the LM head three times its
  forward in backward (the fused chunked head recomputes its logits);
* **attention**: causal flash attention, ``2 b s^2 H / tp`` FLOPs forward per layer (the causal
  half of QK^T and PV), 2.5x that backward (flash's backward recomputes the scores), at
  ``Hardware.attention_rate(seq)`` (measured on an H200 unless ``--attention-tflops`` is given);
* **memory-bound kernels** (norms, RoPE, SwiGLU's product, residual adds, casts): ``ELEMENTWISE_TRAFFIC`` x the bytes the chunk saves for backward, at ``hbm_gb_per_s``;
* **recompute**: full adds the blocks' forward again, selective the attention forward;
* **TP**: per layer 2 all-reduces forward and 2 backward (2 more when full recompute re-runs the
  forward) of ``a N h`` bytes - reduce-scatter + all-gather under SP, the same volume - on the
  critical path, ring cost ``2 (t-1)/t x bytes / nvlink_gb_per_s``; plus the embedding's and LM
  head's all-reduces and the fused head's two small ones per chunk of ``logits_chunk_tokens``;
* **PP**: one activation and one gradient transfer per micro-batch and chunk boundary,
  ``a Ns h`` bytes over InfiniBand when neighbouring stages sit on different nodes, exposed.

Pipeline: ``T = (m - 1) t_max + sum_r t_r`` for 1F1B (fill and drain pass every stage once;
bubble ~ (pp-1)/m), ``T = t_max (m + (pp-1)/v)`` for interleaved 1F1B, ``m t`` without PP.

DP (FSDP2, ``dp_collective``): all-gathers of the compute-dtype parameters and reduce-scatters of
fp32 gradients, cost ``max(S (n-1)/n / (k ib), S (d-1)/d / nvlink)`` for ``S`` bytes over ``d``
ranks on ``n`` nodes with ``k`` of them per node (the node's k NICs carry the inter-node share),
plus ring latency (``n`` InfiniBand and ``d - n`` NVLink hops) and a launch cost per FSDP unit.
With ``overlap_dp``, a collective hides behind the compute it is prefetched against (a
micro-batch's forward or backward) and only the excess plus the first unit's gather and the last
unit's reduce show; under PP the gather happens once per step (parameters stay gathered) and the
reduce once after the last micro-batch, with PP = 1 every micro-batch gathers twice (ZeRO-3).
``dp_shard='none'``: one fp32 all-reduce after backward, not overlapped (as the engine does it).
Optimizer: fused AdamW reads and writes ~28 bytes per local element, clipping ~12, at HBM speed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from megatron_phi4.config import ModelConfig
from megatron_phi4.planner.activations import MicroBatchShape, chunk_saved
from megatron_phi4.planner.hardware import Hardware
from megatron_phi4.planner.layout import Layout
from megatron_phi4.planner.model_shapes import Chunk, rank_chunks

# Bytes of memory-bound traffic per byte saved for backward. Ideal fusion would move ~4 (each saved
# tensor written and read forward, its gradient written and read backward); the unfused local
# backend (fp32 norms, casts, RoPE, SwiGLU, softmax) measured 18-22 on an H200 across seq 4K/16K and
# every recompute mode (benchmarks/planner_calibration.py, docs/planner.md): calibrated, not derived.
ELEMENTWISE_TRAFFIC = 21.0
ATTENTION_BACKWARD_FACTOR = 2.5


def block_matmul_params(cfg: ModelConfig) -> int:
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_kv_heads * d
    return h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size


def palm_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """``6 N + 12 L H T`` (docs/metrics.md), for MFU."""
    n = cfg.num_layers * block_matmul_params(cfg) + cfg.hidden_size * cfg.vocab_size
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * seq


@dataclass
class StepTime:
    """Seconds per optimizer step and where they go (critical path of the slowest rank)."""

    compute: float  # per-micro-batch compute of the slowest rank x m
    tp_comm: float
    pp_comm: float
    bubble: float
    dp_exposed: float
    optimizer: float
    tokens_per_s: float = 0.0
    mfu: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.pp_comm + self.bubble + self.dp_exposed + self.optimizer

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d


def _ring(bytes_: float, ranks: int, bw_gb_per_s: float, step_latency_us: float, hw: Hardware) -> float:
    """All-gather or reduce-scatter of ``bytes_`` (full size) as a ring over ``ranks`` ranks."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) / ranks * bytes_ / (bw_gb_per_s * 1e9) + ((ranks - 1) * step_latency_us
                                                                  + hw.launch_latency_us) * 1e-6


def dp_collective(bytes_: float, layout: Layout, hw: Hardware, collectives: int = 1) -> float:
    """All-gathers or reduce-scatters of ``bytes_`` in total (full size), issued as ``collectives``
    separate calls (FSDP2: one per unit), over the DP group. Inside a node: a ring over NVLink.
    Across nodes: the node's ``k`` DP ranks each own a NIC, so the inter-node share
    ``(n-1)/n`` of the data crosses ``k`` links. Latency: a ring of ``d`` ranks on ``n`` nodes
    passes ``n`` InfiniBand hops and ``d - n`` NVLink hops per collective."""
    d = layout.dp
    if d <= 1:
        return 0.0
    span = d * layout.tp  # DP ranks of a stage sit tp apart in global rank order
    if span <= hw.gpus_per_node:
        return (collectives - 1) * ((d - 1) * hw.nvlink_step_latency_us + hw.launch_latency_us) * 1e-6 + _ring(
            bytes_, d, hw.nvlink_gb_per_s, hw.nvlink_step_latency_us, hw)
    per_node = max(1, hw.gpus_per_node // layout.tp)
    nodes = math.ceil(d / per_node)
    inter = bytes_ * (nodes - 1) / nodes / (per_node * hw.ib_gb_per_s * 1e9)
    intra = bytes_ * (d - 1) / d / (hw.nvlink_gb_per_s * 1e9)
    hops = nodes * hw.ib_step_latency_us + (d - nodes) * hw.nvlink_step_latency_us
    return max(inter, intra) + collectives * (hops + hw.launch_latency_us) * 1e-6


@dataclass
class ChunkTime:
    forward: float
    backward: float
    tp_comm: float
    pp_comm: float

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.tp_comm + self.pp_comm


def chunk_time(cfg: ModelConfig, layout: Layout, chunk: Chunk, seq: int, hw: Hardware) -> ChunkTime:
    """Forward, backward (incl. recompute) and communication of one micro-batch through one chunk."""
    t, a, b = layout.tp, layout.act_bytes, layout.micro_batch
    n = b * seq
    layers = len(chunk.layers)
    mm_rate = (hw.matmul_tflops if layout.precision == "bf16" else hw.fp32_matmul_tflops) * 1e12
    att_rate = (hw.attention_rate(seq) if layout.precision == "bf16" else hw.fp32_matmul_tflops) * 1e12
    block_mm = 2.0 * n * block_matmul_params(cfg) / t
    head_mm = 2.0 * n * cfg.hidden_size * cfg.vocab_size / t if chunk.head else 0.0
    att = 2.0 * b * seq * seq * cfg.num_attention_heads * cfg.head_dim / t
    mb = MicroBatchShape(b, seq, t, layout.sequence_parallel, a)
    saved = sum(chunk_saved(cfg, mb, "none", layers, embedding=chunk.embedding, head=chunk.head,
                            pipelined=False).values())
    elementwise = ELEMENTWISE_TRAFFIC * saved / (hw.hbm_gb_per_s * 1e9)
    fwd = layers * (block_mm / mm_rate + att / att_rate) + head_mm / mm_rate + elementwise / 3
    # the fused head recomputes each chunk's logits in backward: three head matmuls, not two
    bwd = layers * (2 * block_mm / mm_rate + ATTENTION_BACKWARD_FACTOR * att / att_rate) + 3 * head_mm / mm_rate
    bwd += 2 * elementwise / 3
    if layout.recompute == "full":
        bwd += layers * (block_mm / mm_rate + att / att_rate) + elementwise / 3
    elif layout.recompute == "selective":
        bwd += layers * att / att_rate

    tp_comm = 0.0
    if t > 1:
        ar = 2 * _ring(a * n * cfg.hidden_size, t, hw.nvlink_gb_per_s, hw.nvlink_step_latency_us, hw)
        per_layer = 4 + (2 if layout.recompute == "full" else 0)
        tp_comm = layers * per_layer * ar + (ar if chunk.embedding else 0.0)
        if chunk.head:
            # per chunk of c tokens: the row max (4c bytes) and the two sums (8c), forward only
            c = min(cfg.logits_chunk_tokens, n)
            chunks = -(-n // c)
            tp_comm += ar + chunks * 2 * (_ring(4 * c, t, hw.nvlink_gb_per_s, hw.nvlink_step_latency_us, hw)
                                          + _ring(8 * c, t, hw.nvlink_gb_per_s, hw.nvlink_step_latency_us, hw))
    pp_comm = 0.0
    if layout.pp > 1:
        stream = a * mb.stream_tokens * cfg.hidden_size
        cross_node = layout.tp * layout.dp >= hw.gpus_per_node
        bw, lat = ((hw.ib_gb_per_s, hw.ib_step_latency_us) if cross_node
                   else (hw.nvlink_gb_per_s, hw.nvlink_step_latency_us))
        transfers = (chunk.stage > 0) + (chunk.stage < layout.num_stages - 1)
        pp_comm = transfers * (stream / (bw * 1e9) + (lat + hw.launch_latency_us) * 1e-6)
    return ChunkTime(fwd, bwd, tp_comm, pp_comm)


def _dp_exposed(layout: Layout, hw: Hardware, m: int, times: list[ChunkTime], gathered: int,
                units: dict[str, int]) -> float:
    """DP communication of one rank that compute does not hide (see the module docstring)."""
    n_units = len(units)
    if layout.dp_shard == "none":
        return 2 * dp_collective(4 * gathered, layout, hw)  # one all-reduce after backward, not overlapped
    p_bytes = layout.act_bytes
    ag = dp_collective(p_bytes * gathered, layout, hw, n_units)
    rs = dp_collective(4 * gathered, layout, hw, n_units)
    largest = max(units.values())  # TP-local numel: the full size a unit gathers
    ag_unit, rs_unit = dp_collective(p_bytes * largest, layout, hw), dp_collective(4 * largest, layout, hw)
    fwd = sum(c.forward for c in times)
    bwd = sum(c.backward for c in times)
    if not hw.overlap_dp:
        if layout.pp > 1:
            return ag + rs
        return m * 2 * ag + (m if layout.sync_grads_every_microbatch else 1) * rs
    if layout.pp > 1:  # gathered once for the whole step, reduced once after the last micro-batch
        return max(0.0, ag - fwd) + ag_unit + max(0.0, rs - bwd) + rs_unit
    # ZeRO-3: every micro-batch gathers in forward and again in backward
    if layout.sync_grads_every_microbatch:
        return m * (max(0.0, ag - fwd) + max(0.0, ag + rs - bwd) + ag_unit) + rs_unit
    return m * (max(0.0, ag - fwd) + max(0.0, ag - bwd) + ag_unit) + max(0.0, rs - bwd) + rs_unit


def step_time(cfg: ModelConfig, layout: Layout, *, seq_length: int, global_batch: int, hw: Hardware) -> StepTime:
    m = layout.microbatches(global_batch)
    ranks = []  # per pipeline rank: chunk times, gathered (padded) numel, own shard numel, units
    for r in range(layout.pp):
        chunks = rank_chunks(cfg, layout, r)
        times = [chunk_time(cfg, layout, c, seq_length, hw) for c in chunks]
        gathered = sum(tt.fsdp_padded_rows(layout.dp) * layout.dp * tt.row_numel for c in chunks for tt in c.tensors)
        own = sum(tt.fsdp_rows(0, layout.dp) * tt.row_numel if layout.dp_shard == "fsdp" else tt.numel
                  for c in chunks for tt in c.tensors)
        units: dict[str, int] = {}
        for c in chunks:
            for tt in c.tensors:
                units[tt.unit] = units.get(tt.unit, 0) + tt.numel
        ranks.append((times, gathered, own, units))
    per_rank = [sum(c.total for c in times) for times, *_ in ranks]
    slowest = max(range(layout.pp), key=lambda r: per_rank[r])
    times = ranks[slowest][0]
    compute_mb = sum(c.forward + c.backward for c in times)
    tp_mb = sum(c.tp_comm for c in times)
    pp_mb = sum(c.pp_comm for c in times)
    t_max = per_rank[slowest]
    if layout.pp == 1:
        pipeline = m * t_max
    elif layout.chunks == 1:
        pipeline = (m - 1) * t_max + sum(per_rank)
    else:
        pipeline = t_max * (m + (layout.pp - 1) / layout.chunks)
    bubble = pipeline - m * t_max
    dp_exposed = max(_dp_exposed(layout, hw, m, times_r, gathered, units) for times_r, gathered, _, units in ranks)
    own_max = max(own for _, _, own, _ in ranks)
    optimizer = own_max * 40.0 / (hw.hbm_gb_per_s * 1e9)
    st = StepTime(compute=m * compute_mb, tp_comm=m * tp_mb, pp_comm=m * pp_mb, bubble=bubble,
                  dp_exposed=dp_exposed, optimizer=optimizer)
    tokens = global_batch * seq_length
    st.tokens_per_s = tokens / st.total
    st.mfu = st.tokens_per_s * palm_flops_per_token(cfg, seq_length) / (layout.gpus * hw.peak_tflops * 1e12)
    return st
