"""The ``local`` backend: plain PyTorch pieces on every machine, Megatron-style TP/SP layers.

Each piece is built for one ``ParallelContext``. Without tensor parallelism (``tp_group=None``)
the TP layers of ``distributed/tensor_parallel.py`` are plain linears and no collective runs, so
one set of classes serves one process and every layout. Collectives per piece under TP:

* ``norm_linear`` (attention input): RMSNorm on the residual stream (this rank's sequence shard
  under SP), then one ``copy_to_tp`` (or the SP all-gather) for all its projections;
* ``norm_mlp``: the same entry, gate/up column-parallel, down row-parallel (all-reduce, or
  reduce-scatter under SP);
* ``linear(parallel="row")``: all-reduce or reduce-scatter of the partial products;
* ``embedding``: vocabulary-parallel lookup, reduced (scattered along the sequence under SP);
* ``lm_head``: prepares its own input and returns this rank's vocabulary shard of the logits
  (the loss is vocab-parallel and never gathers them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_phi4.distributed.sharding import child_layout, whole
from megatron_phi4.distributed.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    prepare_tp_input,
)
from megatron_phi4.layers.backend import AttentionMetadata, ParallelContext


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; the weight is applied after casting back, as in the release.
    Replicated over TP; under sequence parallelism each rank normalizes its own positions, so the
    weight's gradient is partial per rank (declared ``sp_grad``)."""

    def __init__(self, dim: int, eps: float, sequence_parallel: bool = False):
        super().__init__()
        self.eps, self.sequence_parallel = eps, sequence_parallel
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def param_layout(self):
        return {"weight": [whole("weight", self.weight.shape, sp_grad=self.sequence_parallel)]}


class NormLinear(nn.Module):
    """RMSNorm followed by column-parallel projections that all read the normalized input (Q, K and
    V): one TP entry collective for all of them. Returns the projections' outputs in order."""

    def __init__(self, hidden: int, outputs: dict[str, int], eps: float, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.norm = RMSNorm(hidden, eps, ctx.sequence_parallel)
        self.names = tuple(outputs)
        for name, width in outputs.items():
            self.add_module(name, ColumnParallelLinear(hidden, width, ctx.tp_group, input_mode="none"))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = prepare_tp_input(self.norm(x), self.ctx.tp_group, self.ctx.sequence_parallel)
        return tuple(getattr(self, name)(h) for name in self.names)

    def param_layout(self):
        return child_layout(self)


class NormSwiGLU(nn.Module):
    """RMSNorm then the SwiGLU MLP ``down(silu(gate(n)) * up(n))``: gate/up column-parallel (each
    rank holds matching gate and up columns, so the product is local), down row-parallel."""

    def __init__(self, hidden: int, ffn: int, eps: float, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.norm = RMSNorm(hidden, eps, ctx.sequence_parallel)
        self.gate_proj = ColumnParallelLinear(hidden, ffn, ctx.tp_group, input_mode="none")
        self.up_proj = ColumnParallelLinear(hidden, ffn, ctx.tp_group, input_mode="none")
        self.down_proj = RowParallelLinear(ffn, hidden, ctx.tp_group, sequence_parallel=ctx.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = prepare_tp_input(self.norm(x), self.ctx.tp_group, self.ctx.sequence_parallel)
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def param_layout(self):
        return child_layout(self)


class SDPAttention(nn.Module):
    """Grouped-query attention with ``torch.nn.functional.scaled_dot_product_attention``; query head
    h reads KV head h // (heads / kv_heads) (``enable_gqa``). Plain causal rows use ``is_causal``;
    packed documents and chunked decoding use a boolean mask built once per forward."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, ctx: ParallelContext):
        super().__init__()
        for what, n in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if n % ctx.tp_size:
                raise ValueError(f"attention: {what}={n} is not divisible by the tensor-parallel size {ctx.tp_size}")
        self.num_heads, self.num_kv_heads = num_heads // ctx.tp_size, num_kv_heads // ctx.tp_size
        self.head_dim = head_dim

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        batch, seq = q.shape[:2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # bshd -> bhsd
        mask = meta.cached("dense_mask", lambda: dense_attention_mask(meta))
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(batch, seq, -1)

    def param_layout(self):
        return {}


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, 1, seq, seq) mask, True where attention is allowed: causal and within a document."""
    seq = document_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    return (same_doc & causal)[:, None]


def dense_attention_mask(meta: AttentionMetadata) -> torch.Tensor | None:
    """None for plain causal rows (or one decoded token, which sees everything cached)."""
    if meta.document_ids is not None:
        return document_causal_mask(meta.document_ids)
    if meta.past and meta.seq > 1:  # new queries sit at the end of the key range: bottom-right causal
        return torch.ones(meta.seq, meta.past + meta.seq, dtype=torch.bool, device=meta.device).tril(diagonal=meta.past)
    return None


class LocalBackend:
    """Plain PyTorch pieces (see the module docstring); registered as ``model.backend: local``."""

    name = "local"

    def __init__(self, ctx: ParallelContext | None = None, fp8=None):
        self.ctx = ctx or ParallelContext()
        self.fp8 = fp8 if fp8 is not None and fp8.enabled else None  # model.fp8 (torchao float8 linears)

    def for_layer(self, layer_idx: int, num_layers: int) -> "LocalBackend":
        """The backend of one decoder layer: without FP8 for the layers ``model.fp8`` keeps in bf16."""
        if self.fp8 is None or not self.fp8.bf16_layer(layer_idx, num_layers):
            return self
        return type(self)(self.ctx)

    def _precision(self, module: nn.Module) -> nn.Module:
        """FP8 (``layers/float8.py``) for the decoder layers' TP linears when ``model.fp8`` is on."""
        if self.fp8 is None:
            return module
        from megatron_phi4.layers.float8 import convert_to_float8

        return convert_to_float8(module, self.fp8)

    def embedding(self, vocab_size: int, hidden: int) -> nn.Module:
        return VocabParallelEmbedding(vocab_size, hidden, self.ctx.tp_group,
                                      sequence_parallel=self.ctx.sequence_parallel)

    def norm(self, hidden: int, eps: float) -> nn.Module:
        return RMSNorm(hidden, eps, self.ctx.sequence_parallel)

    def norm_linear(self, hidden: int, outputs: dict[str, int], eps: float) -> nn.Module:
        return self._precision(NormLinear(hidden, outputs, eps, self.ctx))

    def linear(self, in_features: int, out_features: int, parallel: str) -> nn.Module:
        return self._precision(self._linear(in_features, out_features, parallel))

    def _linear(self, in_features: int, out_features: int, parallel: str) -> nn.Module:
        if parallel == "column":
            mode = "gather_seq" if self.ctx.sequence_parallel else "copy"
            return ColumnParallelLinear(in_features, out_features, self.ctx.tp_group, input_mode=mode)
        if parallel == "row":
            return RowParallelLinear(in_features, out_features, self.ctx.tp_group,
                                     sequence_parallel=self.ctx.sequence_parallel)
        raise ValueError(f"linear: parallel={parallel!r}, allowed: 'column', 'row'")

    def core_attention(self, num_heads: int, num_kv_heads: int, head_dim: int) -> nn.Module:
        return SDPAttention(num_heads, num_kv_heads, head_dim, self.ctx)

    def norm_mlp(self, hidden: int, ffn: int, eps: float) -> nn.Module:
        return self._precision(NormSwiGLU(hidden, ffn, eps, self.ctx))

    def lm_head(self, hidden: int, vocab_size: int) -> nn.Module:
        # Prepares its own input (copy, or the SP all-gather); no output gather: vocab-parallel loss.
        # Never FP8: the logits feed the loss directly (Megatron and torchtitan keep it in bf16 too).
        return self._linear(hidden, vocab_size, "column")
