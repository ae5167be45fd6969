"""One candidate layout and the rules that rule it out before any memory or time is estimated.

A ``Layout`` is everything the planner varies: the three parallel sizes, the pipeline schedule,
the micro-batch, recompute, precision, sequence parallelism and how DP shards. It converts to the
trainer's own ``ParallelConfig`` so the structural checks are the trainer's (``validate``: heads
divisible by tp, enough layers for the stages, schedule rules) and the messages are the ones a
user would get at start-up, word for word. The planner adds the rules the config cannot know:
the cluster (TP inside a node), the batch (global batch divisible by micro-batch x dp, the
interleaved schedule's rounds) and what it does not model (bf16 without FSDP: autocast).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_phi4.config import ConfigError, ModelConfig, ParallelConfig

PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class Layout:
    """One way to run a model on ``tp * pp * dp`` GPUs.

    ``virtual_stages``: model chunks per pipeline rank (> 1 only with ``interleaved_1f1b``).
    ``precision``: "bf16" = FSDP2 mixed precision (bf16 compute and gathered parameters, fp32
    master weights, gradients and AdamW state; what ``mixed_precision: auto`` does on GPUs),
    "fp32" = everything fp32.
    ``sync_grads_every_microbatch``: the engine option (pp = 1 with FSDP) that reduce-scatters every
    micro-batch instead of holding unsharded fp32 gradients; recipes do not expose it, so the
    planner does not enumerate it, but the memory model honours it.
    """

    tp: int
    pp: int
    dp: int
    micro_batch: int = 1
    recompute: str = "none"
    precision: str = "bf16"
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1
    dp_shard: str = "fsdp"
    pp_embedding_cost: float = 0.0
    pp_head_cost: float = 0.0
    sync_grads_every_microbatch: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def chunks(self) -> int:
        """Model chunks per pipeline rank (1 without pipelining)."""
        return self.virtual_stages if self.pp > 1 else 1

    @property
    def num_stages(self) -> int:
        return self.pp * self.chunks

    @property
    def act_bytes(self) -> int:
        """Bytes per activation element (the compute dtype)."""
        return 2 if self.precision == "bf16" else 4

    def microbatches(self, global_batch: int) -> int:
        """Micro-batches per DP rank and step."""
        return global_batch // (self.micro_batch * self.dp)

    def schedule_name(self) -> str:
        if self.pp == 1:
            return "none"
        return self.pp_schedule if self.pp_schedule != "interleaved_1f1b" else f"interleaved(v={self.virtual_stages})"

    def to_parallel_config(self) -> ParallelConfig:
        """The trainer's ``parallel:`` section for this layout."""
        return ParallelConfig(
            tp=self.tp, pp=self.pp, dp=self.dp, sequence_parallel=self.sequence_parallel,
            pp_schedule=self.pp_schedule if self.pp > 1 else "1f1b", virtual_stages=self.chunks,
            pp_embedding_cost=self.pp_embedding_cost, pp_head_cost=self.pp_head_cost,
            dp_shard=self.dp_shard, recompute=self.recompute, mixed_precision=self.precision)

    def short(self) -> str:
        sp = "+sp" if self.sequence_parallel else ""
        shard = self.dp_shard + ("+sync" if self.sync_grads_every_microbatch else "")
        return (f"tp{self.tp}{sp} pp{self.pp} {self.schedule_name()} dp{self.dp} ({shard}) "
                f"mb{self.micro_batch} {self.recompute} {self.precision}")

    def as_dict(self) -> dict:
        return asdict(self)


def structural_problems(layout: Layout, model: ModelConfig, *, global_batch: int, seq_length: int,
                        gpus_per_node: int) -> list[str]:
    """Why ``layout`` cannot run at all (empty if it can); memory is checked elsewhere."""
    problems = []
    try:
        layout.to_parallel_config().validate(model, layout.gpus)
    except ConfigError as e:
        problems.append(str(e))
    if layout.precision not in PRECISIONS:
        problems.append(f"precision: got {layout.precision!r}, allowed: {', '.join(PRECISIONS)}")
    if layout.tp > gpus_per_node or gpus_per_node % layout.tp:
        problems.append(f"tp={layout.tp}: the tensor-parallel group must sit inside one node of {gpus_per_node} GPUs "
                        f"(tp must divide {gpus_per_node}); its 4 collectives per layer and micro-batch are on the "
                        f"critical path and would cross InfiniBand")
    if layout.precision == "bf16" and layout.dp_shard != "fsdp":
        problems.append("precision bf16 with dp_shard='none': the engine runs it under torch.autocast (fp32 "
                        "residual stream, bf16 matmuls), whose activations the planner does not model; plan it "
                        "with dp_shard='fsdp' (bf16 through FSDP2's MixedPrecisionPolicy, also with dp=1)")
    if layout.sequence_parallel and seq_length % layout.tp:
        problems.append(f"sequence parallelism: seq_length {seq_length} is not divisible by tp={layout.tp}")
    per_step = layout.micro_batch * layout.dp
    if global_batch % per_step:
        problems.append(f"global batch {global_batch} is not divisible by micro_batch x dp = "
                        f"{layout.micro_batch} x {layout.dp} = {per_step}")
    elif layout.pp > 1:
        m = layout.microbatches(global_batch)
        if layout.chunks > 1:
            rounds = max(1, m // layout.pp)
            if m % rounds:
                problems.append(f"interleaved 1F1B: {m} micro-batches per DP rank is not a multiple of the "
                                f"schedule's rounds max(1, m // pp) = {rounds} (torch ScheduleInterleaved1F1B)")
    if layout.sync_grads_every_microbatch and (layout.pp > 1 or layout.dp_shard != "fsdp"):
        problems.append("sync_grads_every_microbatch: only with pp = 1 and dp_shard='fsdp'")
    return problems
