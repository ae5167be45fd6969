"""Megatron-style tensor (and sequence) parallel layers with explicit autograd collectives.

Activations are batch-first ``(batch, seq, hidden)``; the sequence dimension is 1.

Collectives (``g`` is the TP group):

=====================  ===========================  ===========================
function               forward                      backward
=====================  ===========================  ===========================
copy_to_tp             identity                     all-reduce(g)
reduce_from_tp         all-reduce(g)                identity
gather_from_sp         all-gather along seq         reduce-scatter along seq
reduce_scatter_to_sp   reduce-scatter along seq     all-gather along seq
=====================  ===========================  ===========================

Without sequence parallelism a block is ``copy_to_tp -> column-parallel q/k/v (or gate/up) ->
local math -> row-parallel o (or down) -> reduce_from_tp``; with it, ``copy``/``reduce`` become
``gather_from_sp``/``reduce_scatter_to_sp`` and the norms (and residual stream) between blocks hold
only ``seq / tp`` positions.

Why not ``torch.distributed.tensor.parallel`` (DTensor TP)? It would work, but the parameters would
become 2D DTensors (TP x FSDP) whose every op dispatches through DTensor; the explicit functions
below are small, make every collective visible, and keep the parameters plain tensors that FSDP2
then shards over the DP mesh only. With ``group=None`` every layer is its plain single-device
counterpart (no collective runs), so one set of classes serves every layout. Each layer declares
its sharding (``param_layout()``, see ``sharding.py``); which projection gets which style is the
model's tensor-parallel plan (``models/phi4/tp_plan.py``), applied by the layer backend.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_phi4.distributed.sharding import whole

SEQ_DIM = 1


def _world(group) -> int:
    """Size of the TP group; ``None`` means no tensor parallelism (the layers then run as plain ones)."""
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_gather_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    xt = x.movedim(dim, 0).contiguous()
    out = torch.empty((world * xt.shape[0],) + tuple(xt.shape[1:]), dtype=xt.dtype, device=xt.device)
    dist.all_gather_single(out, xt, group=group)
    return out.movedim(0, dim)


def _reduce_scatter_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    xt = x.movedim(dim, 0).contiguous()
    if xt.shape[0] % world:
        raise ValueError(f"sequence parallelism: length {xt.shape[0]} along dim {dim} is not divisible "
                         f"by the tensor-parallel size {world}")
    out = torch.empty((xt.shape[0] // world,) + tuple(xt.shape[1:]), dtype=xt.dtype, device=xt.device)
    dist.reduce_scatter_tensor(out, xt, group=group)
    return out.movedim(0, dim)


def _split_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"sequence parallelism: length {x.shape[dim]} is not divisible by the tensor-parallel "
                         f"size {world}")
    return x.chunk(world, dim=dim)[_rank(group)].contiguous()


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _world(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather_dim(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_dim(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter_dim(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim(grad, ctx.group, ctx.dim), None, None


class _ScatterToSP(torch.autograd.Function):
    """Keep this rank's sequence chunk (forward); all-gather the gradient (backward)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split_dim(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim(grad, ctx.group, ctx.dim), None, None


# Each entry point is the identity when there is no tensor parallelism (no autograd node, no copy).
def copy_to_tp(x, group):
    return x if _world(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return x if _world(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_sp(x, group, dim: int = SEQ_DIM):
    return x if _world(group) == 1 else _GatherFromSP.apply(x, group, dim)


def reduce_scatter_to_sp(x, group, dim: int = SEQ_DIM):
    return x if _world(group) == 1 else _ReduceScatterToSP.apply(x, group, dim)


def scatter_to_sp(x, group, dim: int = SEQ_DIM):
    return x if _world(group) == 1 else _ScatterToSP.apply(x, group, dim)


def prepare_tp_input(x, group, sequence_parallel: bool):
    """Entry of a tensor-parallel region: replicated input (copy) or sequence shard (all-gather)."""
    return gather_from_sp(x, group) if sequence_parallel else copy_to_tp(x, group)


def _shard_range(total: int, group) -> tuple[int, int]:
    world = _world(group)
    if total % world:
        raise ValueError(f"dimension {total} is not divisible by the tensor-parallel size {world}")
    size = total // world
    return _rank(group) * size, size


class ColumnParallelLinear(nn.Linear):
    """``y = x A^T`` with A split by output rows: rank r holds rows ``[r*out/tp, (r+1)*out/tp)``.

    input_mode: "copy" (replicated input; identity forward / all-reduce backward), "gather_seq"
    (sequence-parallel input; all-gather forward / reduce-scatter backward) or "none" (the parent
    module already prepared the input once for several projections, e.g. q/k/v).
    gather_output: all-gather the output features (never used for the LM head: the loss is
    vocab-parallel).
    """

    def __init__(self, in_features: int, out_features: int, group, *, bias: bool = False,
                 input_mode: str = "copy", gather_output: bool = False, device=None, dtype=None):
        start, size = _shard_range(out_features, group)
        super().__init__(in_features, size, bias=bias, device=device, dtype=dtype)
        if input_mode not in ("copy", "gather_seq", "none"):
            raise ValueError(f"input_mode: {input_mode!r}, allowed: 'copy', 'gather_seq', 'none'")
        self.group, self.input_mode, self.gather_output = group, input_mode, gather_output
        self.global_out_features, self.shard_offset = out_features, start

    def param_layout(self):
        """Rows [offset, offset + local) of the global (out, in) weight."""
        tp = self.global_out_features // self.out_features
        layout = {"weight": [whole("weight", (self.global_out_features, self.in_features), tp_dim=0,
                                   tp_offset=self.shard_offset, tp_size=tp)]}
        if self.bias is not None:
            layout["bias"] = [whole("bias", (self.global_out_features,), tp_dim=0, tp_offset=self.shard_offset,
                                    tp_size=tp)]
        return layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_mode == "copy":
            x = copy_to_tp(x, self.group)
        elif self.input_mode == "gather_seq":
            x = gather_from_sp(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = gather_from_sp(y, self.group, dim=-1)
        return y

    @torch.no_grad()
    def load_full(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight.copy_(weight[self.shard_offset:self.shard_offset + self.out_features])
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias[self.shard_offset:self.shard_offset + self.out_features])

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, global_out_features={self.global_out_features}, "
                f"input_mode={self.input_mode}")


class RowParallelLinear(nn.Linear):
    """``y = x A^T`` with A split by input columns; the input is already split along features
    (the output of a column-parallel layer), the partial products are summed: all-reduce, or
    reduce-scatter along the sequence under sequence parallelism. A bias is added once, after."""

    def __init__(self, in_features: int, out_features: int, group, *, bias: bool = False,
                 sequence_parallel: bool = False, device=None, dtype=None):
        start, size = _shard_range(in_features, group)
        super().__init__(size, out_features, bias=bias, device=device, dtype=dtype)
        self.group, self.sequence_parallel = group, sequence_parallel
        self.global_in_features, self.shard_offset = in_features, start

    def param_layout(self):
        """Columns [offset, offset + local) of the global (out, in) weight; the bias is replicated."""
        layout = {"weight": [whole("weight", (self.out_features, self.global_in_features), tp_dim=1,
                                   tp_offset=self.shard_offset)]}
        if self.bias is not None:  # added after the reduction: partial gradients under sequence parallelism
            layout["bias"] = [whole("bias", (self.out_features,), sp_grad=self.sequence_parallel)]
        return layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sp(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def load_full(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight.copy_(weight[:, self.shard_offset:self.shard_offset + self.in_features])
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, global_in_features={self.global_in_features}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Embedding):
    """Embedding table split by vocabulary rows; out-of-range tokens give zeros locally and the
    partial embeddings are summed (all-reduce, or reduce-scatter along the sequence under SP)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group, *, sequence_parallel: bool = False,
                 device=None, dtype=None):
        start, size = _shard_range(num_embeddings, group)
        super().__init__(size, embedding_dim, device=device, dtype=dtype)
        self.group, self.sequence_parallel = group, sequence_parallel
        self.global_num_embeddings, self.shard_offset = num_embeddings, start

    def param_layout(self):
        """Rows [offset, offset + local) of the global (vocab, hidden) table."""
        tp = self.global_num_embeddings // self.num_embeddings
        return {"weight": [whole("weight", (self.global_num_embeddings, self.embedding_dim), tp_dim=0,
                                 tp_offset=self.shard_offset, tp_size=tp)]}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.shard_offset
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sp(out, self.group) if self.sequence_parallel else reduce_from_tp(out, self.group)

    @torch.no_grad()
    def load_full(self, weight: torch.Tensor) -> None:
        self.weight.copy_(weight[self.shard_offset:self.shard_offset + self.num_embeddings])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, global_num_embeddings={self.global_num_embeddings}"
