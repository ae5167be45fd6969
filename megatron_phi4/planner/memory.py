"""Memory per GPU of a layout: exact state bytes, modelled buffers and activations.

Three kinds of terms, kept apart in ``MemoryBreakdown``:

* **State** (exact): fp32 parameters, fp32 gradients and AdamW's ``exp_avg``/``exp_avg_sq`` (fp32)
  plus one fp32 ``step`` scalar per parameter, for this rank's tensors (``model_shapes``). With FSDP2
  every rank allocates the *padded* shard of each parameter (``ceil(rows/dp)`` rows, FSDP's
  ``chunks[0]``), gradients live in a flat reduce-scatter output padded the same way, and AdamW's
  moments are ``zeros_like`` the unpadded local shard. With ``dp_shard='none'`` everything is the
  full TP-local tensor. These are the bytes the trainer allocates, counted by storage (tested).
* **Buffers** (from the engine's rules): FSDP's gathered parameters in the compute dtype (all of
  a rank's chunks under PP, where ``reshard_after_forward=False``; the root unit plus two blocks
  with PP = 1: the one running and the one prefetched), fp32 unsharded gradients accumulated until
  the last micro-batch (PP, or PP = 1 with several micro-batches, unless syncing every one; counted
  where they meet the activation peak: from the first backward on), the
  pipeline's receive buffers (``PipelineStage`` allocates one activation and one gradient buffer
  per micro-batch and keeps them with the cached schedule).
* **Activations** (``activations.py``): what the in-flight micro-batches keep for backward, times
  how many the schedule holds at its peak (``in_flight``), plus one transient peak (the loss, or a
  block's backward, or the unsharded gradients of the unit being reduced).

Plus a reserve for the CUDA context, NCCL and allocator fragmentation (``Hardware``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_phi4.config import ModelConfig
from megatron_phi4.planner.activations import (
    MicroBatchShape, block_backward_moment, chunk_saved, head_backward_moment, head_forward_moment, head_saved,
)
from megatron_phi4.planner.layout import Layout
from megatron_phi4.planner.model_shapes import Chunk, rank_chunks

FP32 = 4
ADAM_STEP_BYTES = 4  # torch AdamW's `step`: a float32 scalar tensor per parameter (fused or not)
GIB = 1024 ** 3


@dataclass(frozen=True)
class StateBytes:
    parameters: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def state_bytes(model: ModelConfig, layout: Layout, pp_rank: int, dp_rank: int = 0,
                chunks: list[Chunk] | None = None) -> StateBytes:
    """Exact fp32 parameter, gradient and AdamW bytes of one rank (any TP rank of it)."""
    chunks = chunks if chunks is not None else rank_chunks(model, layout, pp_rank)
    params = grads = opt = 0
    for chunk in chunks:
        for t in chunk.tensors:
            if layout.dp_shard == "fsdp":
                padded = t.fsdp_padded_rows(layout.dp) * t.row_numel
                own = t.fsdp_rows(dp_rank, layout.dp) * t.row_numel
            else:
                padded = own = t.numel
            params += FP32 * padded
            grads += FP32 * padded
            opt += 2 * FP32 * own + ADAM_STEP_BYTES
    return StateBytes(params, grads, opt)


def in_flight(layout: Layout, pp_rank: int, m: int) -> list[int]:
    """Micro-batches whose activations a rank holds at its peak, per local chunk.

    1F1B: rank r runs ``pp - 1 - r`` warm-up forwards and one more before its first backward, so
    it holds ``min(m, pp - r)``. With fewer micro-batches than stages the engine falls back to
    GPipe, which holds all ``m``. Interleaved 1F1B (torch's ``ScheduleInterleaved1F1B``): warm-up
    ``(v - 1) * mpr + 2 * (pp - 1 - r)`` forwards (``mpr = m // max(1, m // pp)``), capped at
    ``m * v``, plus one; forward op ``k`` runs local chunk ``(k // mpr) % v``.
    """
    if layout.pp == 1:
        return [1]
    if layout.chunks == 1:
        if layout.pp_schedule == "gpipe" or m < layout.pp:
            return [m]
        return [min(m, layout.pp - pp_rank)]
    v, pp = layout.chunks, layout.pp
    mpr = m // max(1, m // pp)
    warmup = min((v - 1) * mpr + 2 * (pp - 1 - pp_rank), m * v)
    counts = [0] * v
    for k in range(min(warmup + 1, m * v)):
        counts[(k // mpr) % v] += 1
    return counts


@dataclass
class MemoryBreakdown:
    """Predicted bytes on one GPU (the rank of pipeline rank ``pp_rank``, DP rank 0)."""

    pp_rank: int
    parameters: int
    gradients: int
    optimizer: int
    gathered_parameters: int
    accumulated_gradients: int
    pipeline_buffers: int
    activations: int
    transient: int
    reserve: int
    in_flight: list[int] = field(default_factory=list)
    activation_items: dict[str, int] = field(default_factory=dict)

    COMPONENTS = ("parameters", "gradients", "optimizer", "gathered_parameters", "accumulated_gradients",
                  "pipeline_buffers", "activations", "transient", "reserve")

    @property
    def total(self) -> int:
        return sum(getattr(self, k) for k in self.COMPONENTS)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.COMPONENTS}
        d.update(total=self.total, pp_rank=self.pp_rank, in_flight=self.in_flight,
                 activation_items=self.activation_items)
        return d


def _unit_numels(chunks: list[Chunk]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in chunks:
        out.update(c.unit_numels())
    return out


def rank_memory(model: ModelConfig, layout: Layout, pp_rank: int, *, seq_length: int, global_batch: int,
                reserve_bytes: int = 0, fragmentation: float = 0.0, packed_documents: bool = True) -> MemoryBreakdown:
    """Predicted peak memory of pipeline rank ``pp_rank`` (DP rank 0, which holds the most).
    ``packed_documents``: rows hold several documents (attention's per-document path, which saves
    the attention output twice); False for one document per row."""
    chunks = rank_chunks(model, layout, pp_rank)
    state = state_bytes(model, layout, pp_rank, 0, chunks)
    m = layout.microbatches(global_batch)
    fsdp, pipelined = layout.dp_shard == "fsdp", layout.pp > 1
    p_bytes = layout.act_bytes  # FSDP's param_dtype: bf16 copies, or fp32
    units = _unit_numels(chunks)
    all_local = sum(units.values())

    gathered = 0
    if fsdp:
        # the all-gather output is padded to dp * ceil(rows/dp) rows
        padded = {}
        for c in chunks:
            for t in c.tensors:
                padded[t.unit] = padded.get(t.unit, 0) + t.fsdp_padded_rows(layout.dp) * layout.dp * t.row_numel
        if pipelined:
            gathered = p_bytes * sum(padded.values())
        else:
            pblocks = sorted((n for u, n in padded.items() if u.startswith("layers.")), reverse=True)
            gathered = p_bytes * (sum(n for u, n in padded.items() if u.startswith("root")) + sum(pblocks[:2]))
    accumulate = fsdp and m > 1 and (pipelined or not layout.sync_grads_every_microbatch)

    mb = MicroBatchShape(layout.micro_batch, seq_length, layout.tp, layout.sequence_parallel, layout.act_bytes,
                         packed_documents)
    buffers = 0
    if pipelined:
        stream = layout.act_bytes * mb.stream_tokens * model.hidden_size
        for c in chunks:
            buffers += m * stream * ((c.stage > 0) + (c.stage < layout.num_stages - 1))

    counts = in_flight(layout, pp_rank, m)
    activations, items = 0, {}
    for c, n in zip(chunks, counts):
        for k, v in chunk_saved(model, mb, layout.recompute, len(c.layers), embedding=c.embedding, head=c.head,
                                pipelined=pipelined).items():
            items[k] = items.get(k, 0) + n * v
            activations += n * v

    # The fp32 unsharded gradients appear with the first backward: there each FSDP unit keeps the
    # gradients it produces (its share of the accumulation). In a later backward every accumulated
    # gradient exists; fp32 parameters get fresh gradients added in place into ``.grad``, while bf16
    # ones keep the unit's bf16 gradients until its post-backward adds them into the fp32
    # accumulator (FSDP2's ``accumulate_unsharded_grad_if_needed``). The schedule then holds as many
    # micro-batches again only if forwards are left to run (a steady state), otherwise one fewer.
    # The peak is the larger of the two moments.
    grad_bytes = p_bytes if fsdp else FP32
    transient = transient_peak(model, mb, layout, chunks, fsdp=fsdp, pipelined=pipelined, grad_bytes=grad_bytes)
    accumulated = 0
    if accumulate:
        held = sum(counts)
        steady = m * layout.chunks > held if pipelined else m > 1
        after_first_backward = activations if steady else activations * (held - 1) // held
        accumulated = max(0, after_first_backward + FP32 * all_local - activations)
        later_moment = transient_peak(model, mb, layout, chunks, fsdp=p_bytes != FP32, pipelined=pipelined,
                                      grad_bytes=grad_bytes)
        later = after_first_backward + FP32 * all_local - activations + later_moment
        transient = max(transient, later) - accumulated

    if fsdp and not accumulate:  # reduce-scatter input (fp32, padded) of the unit being reduced
        transient += FP32 * max(units.values())
    allocated = (state.total + gathered + accumulated + buffers + activations + transient)
    reserve = reserve_bytes + int(fragmentation * allocated)
    return MemoryBreakdown(pp_rank, state.parameters, state.gradients, state.optimizer, gathered, accumulated,
                           buffers, activations, transient, reserve, counts, items)


def transient_peak(model: ModelConfig, mb: MicroBatchShape, layout: Layout, chunks: list[Chunk], *, fsdp: bool,
                   pipelined: bool, grad_bytes: int) -> int:
    """The largest of the moments that come once per micro-batch on top of the saved activations:

    * the fused LM head + log-softmax on the head chunk, forward (one chunk of fp32 logits) or
      backward (``head_backward_moment``: the recomputed chunk, the fp32 weight-gradient
      accumulator, the input gradient);
    * a block's backward (``block_backward_moment``; gradients in the compute dtype under FSDP,
      fp32 ``.grad`` increments without); under FSDP the head chunk's root unit (final norm + LM
      head) also keeps its gradient until the chunk's backward ends. (``fsdp=False`` also describes
      an FSDP backward whose unsharded gradients already exist from an earlier micro-batch: fresh
      gradients are then added in place, as without FSDP.) The head's own saved tensors
      are gone by then, so they are not counted twice.
    """
    block_tensors = [t for c in chunks for t in c.tensors if t.unit.startswith("layers.")]
    head_chunk = any(c.head for c in chunks)
    largest_weight = grad_bytes * max((t.numel for t in block_tensors), default=0)
    block_moment = block_backward_moment(model, mb, layout.recompute, weight_grad=largest_weight,
                                         units_keep_grads=fsdp) if block_tensors else 0
    if fsdp:  # the head chunk's root unit (final norm + LM head) holds its gradient through the chunk's backward
        block_moment += grad_bytes * sum(t.numel for c in chunks if c.head for t in c.tensors
                                         if t.unit.startswith("root"))
    moments = [block_moment - (sum(head_saved(model, mb).values()) if head_chunk else 0)]
    if head_chunk:
        moments += [head_forward_moment(model, mb), head_backward_moment(model, mb)]
    return max(0, *moments)


def single_device_activation_peak(model: ModelConfig, *, batch: int, seq: int, recompute: str, act_bytes: int,
                                  grad_bytes: int, packed_documents: bool = False) -> dict[str, int]:
    """Peak bytes above parameters, gradients and optimizer state of one training micro-batch on one
    device without FSDP (the whole model, tp = pp = 1, ``.grad`` already allocated): the quantity
    the CPU and GPU memory checks measure. Returns ``{"activations", "transient", "total"}``."""
    layout = Layout(1, 1, 1, micro_batch=batch, recompute=recompute, precision="bf16" if act_bytes == 2 else "fp32",
                    dp_shard="none")
    chunks = rank_chunks(model, layout, 0)
    mb = MicroBatchShape(batch, seq, 1, False, act_bytes, packed_documents)
    saved = chunk_saved(model, mb, recompute, model.num_layers, embedding=True, head=True, pipelined=False)
    acts = sum(saved.values())
    transient = transient_peak(model, mb, layout, chunks, fsdp=False, pipelined=False, grad_bytes=grad_bytes)
    return {"activations": acts, "transient": transient, "total": acts + transient}


def peak_memory(model: ModelConfig, layout: Layout, *, seq_length: int, global_batch: int,
                reserve_bytes: int = 0, fragmentation: float = 0.0, packed_documents: bool = True) -> MemoryBreakdown:
    """The pipeline rank with the largest predicted total (stage 0 holds the most micro-batches, the
    last stage the head and the loss)."""
    return max((rank_memory(model, layout, r, seq_length=seq_length, global_batch=global_batch,
                            reserve_bytes=reserve_bytes, fragmentation=fragmentation,
                            packed_documents=packed_documents) for r in range(layout.pp)),
               key=lambda b: b.total)
