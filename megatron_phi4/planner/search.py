"""Enumerate layouts, rule out the impossible ones with a reason, rank the rest by predicted step time.

``plan_layouts`` is the whole planner: for every candidate ``Layout`` it first applies the
structural rules (``layout.structural_problems``: the trainer's own config validation, TP inside a
node, batch divisibility, schedule constraints), then predicts memory on every pipeline rank and
keeps the worst (``memory.peak_memory``) and rules the layout out if it exceeds the GPU, then
predicts the step time (``timing.step_time``). Feasible layouts come back fastest first.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from megatron_phi4.config import ModelConfig
from megatron_phi4.planner.hardware import Hardware
from megatron_phi4.planner.layout import Layout, structural_problems
from megatron_phi4.planner.memory import GIB, MemoryBreakdown, peak_memory
from megatron_phi4.planner.timing import StepTime, block_matmul_params, step_time

RECOMPUTES = ("none", "selective", "full")


@dataclass
class Candidate:
    layout: Layout
    problems: list[str] = field(default_factory=list)
    memory: MemoryBreakdown | None = None
    time: StepTime | None = None

    @property
    def feasible(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        out = {"layout": self.layout.as_dict(), "feasible": self.feasible, "problems": self.problems}
        if self.memory is not None:
            out["memory_bytes"] = self.memory.as_dict()
        if self.time is not None:
            out["step_time_s"] = self.time.as_dict()
        if self.feasible:
            pc = self.layout.to_parallel_config()
            out["recipe"] = {"parallel": {k: getattr(pc, k) for k in (
                "tp", "pp", "dp", "sequence_parallel", "pp_schedule", "virtual_stages", "pp_embedding_cost",
                "pp_head_cost", "dp_shard", "recompute", "mixed_precision")},
                "data": {"micro_batch_size": self.layout.micro_batch}}
        return out


@dataclass
class SearchSpace:
    """What the planner varies (command-line flags narrow it)."""

    tp: tuple[int, ...] | None = None  # None: powers of two up to a node plus divisors of the KV heads
    pp: tuple[int, ...] | None = None  # None: every divisor of gpus/tp up to the number of layers
    max_virtual_stages: int = 4
    micro_batches: tuple[int, ...] = (1, 2, 4)
    recomputes: tuple[str, ...] = RECOMPUTES
    precisions: tuple[str, ...] = ("bf16", "fp32")
    dp_shards: tuple[str, ...] = ("fsdp", "none")
    sequence_parallel: tuple[bool, ...] = (True, False)
    # the engine's sync_grads_every_microbatch (pp = 1, FSDP): recipes do not expose it, so only on request
    sync_grads_every_microbatch: tuple[bool, ...] = (False,)
    pp_embedding_cost: float = 0.0
    pp_head_cost: float | None = None  # None: the LM head's matmul + loss in units of a layer's matmuls


def default_head_cost(model: ModelConfig) -> float:
    """The LM head's matmul FLOPs in decoder-layer units, rounded to a quarter (the loss's softmax
    adds memory-bound work on top: round up)."""
    ratio = model.hidden_size * model.vocab_size / block_matmul_params(model)
    return round(ratio * 4 + 0.5) / 4


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(model: ModelConfig, gpus: int, space: SearchSpace, gpus_per_node: int) -> Iterator[Layout]:
    tps = space.tp or sorted({t for t in [1, 2, 4, 8, *_divisors(model.num_kv_heads)]
                              if gpus % t == 0 and (t <= gpus_per_node or model.num_kv_heads % t == 0)})
    head_cost = default_head_cost(model) if space.pp_head_cost is None else space.pp_head_cost
    for tp in tps:
        if gpus % tp:
            continue
        pps = space.pp or [p for p in _divisors(gpus // tp) if p <= model.num_layers]
        for pp in pps:
            if (gpus // tp) % pp:
                continue
            dp = gpus // (tp * pp)
            schedules = [("1f1b", 1)]
            if pp > 1:
                schedules += [("interleaved_1f1b", v) for v in range(2, space.max_virtual_stages + 1)
                              if pp * v <= model.num_layers]
            sps = [s for s in space.sequence_parallel if tp > 1 or not s] or [False]
            syncs = [s for s in space.sync_grads_every_microbatch if pp == 1 or not s] or [False]
            for (sched, v), mb, rc, prec, sp, shard, sync in itertools.product(
                    schedules, space.micro_batches, space.recomputes, space.precisions, sps, space.dp_shards, syncs):
                if sync and shard != "fsdp":
                    continue
                yield Layout(tp, pp, dp, micro_batch=mb, recompute=rc, precision=prec, sequence_parallel=sp,
                             pp_schedule=sched, virtual_stages=v, dp_shard=shard,
                             pp_embedding_cost=space.pp_embedding_cost if pp > 1 else 0.0,
                             pp_head_cost=head_cost if pp > 1 else 0.0, sync_grads_every_microbatch=sync)


def evaluate(model: ModelConfig, layout: Layout, *, seq_length: int, global_batch: int, hw: Hardware,
             packed_documents: bool = True) -> Candidate:
    """Rules, memory, time for one layout."""
    cand = Candidate(layout)
    cand.problems = structural_problems(layout, model, global_batch=global_batch, seq_length=seq_length,
                                        gpus_per_node=hw.gpus_per_node)
    if cand.problems:
        return cand
    cand.memory = peak_memory(model, layout, seq_length=seq_length, global_batch=global_batch,
                              reserve_bytes=int(hw.reserve_gib * GIB), fragmentation=hw.fragmentation,
                              packed_documents=packed_documents)
    cand.time = step_time(model, layout, seq_length=seq_length, global_batch=global_batch, hw=hw)
    budget = hw.gpu_memory_gib * GIB
    if cand.memory.total > budget:
        mem = cand.memory
        biggest = max(("activations", "accumulated_gradients", "gathered_parameters", "optimizer", "transient",
                       "pipeline_buffers"), key=lambda k: getattr(mem, k))
        cand.problems.append(f"memory: needs {mem.total / GIB:.1f} GiB on pipeline rank {mem.pp_rank} > "
                             f"{hw.gpu_memory_gib:g} GiB (largest part: {biggest.replace('_', ' ')} "
                             f"{getattr(mem, biggest) / GIB:.1f} GiB)")
    return cand


@dataclass
class PlanResult:
    feasible: list[Candidate]
    infeasible: list[Candidate]


def plan_layouts(model: ModelConfig, gpus: int, *, seq_length: int, global_batch: int, hw: Hardware | None = None,
                 space: SearchSpace | None = None, layouts: Iterable[Layout] | None = None,
                 packed_documents: bool = True) -> PlanResult:
    """Every candidate layout, feasible ones fastest first (within 1%: less memory first).
    ``packed_documents``: rows of several packed documents (the pre-training data); False: one per row."""
    hw = hw or Hardware()
    space = space or SearchSpace()
    if gpus < 1:
        raise ValueError(f"--gpus: must be >= 1, got {gpus}")
    if seq_length > model.max_seq_length:
        raise ValueError(f"--seq-length {seq_length} exceeds the model's max_seq_length {model.max_seq_length}")
    layouts = layouts if layouts is not None else enumerate_layouts(model, gpus, space, hw.gpus_per_node)
    feasible, infeasible = [], []
    for layout in layouts:
        cand = evaluate(model, layout, seq_length=seq_length, global_batch=global_batch, hw=hw,
                        packed_documents=packed_documents)
        (feasible if cand.feasible else infeasible).append(cand)
    # Predicted times closer than ~1% are a tie for a model of this accuracy: the one using less
    # memory (more headroom) goes first.
    feasible.sort(key=lambda c: (math.floor(math.log(c.time.total) / math.log(1.01)), c.memory.total,
                                 c.time.total))
    infeasible.sort(key=lambda c: (c.time.total if c.time else float("inf")))
    return PlanResult(feasible, infeasible)
