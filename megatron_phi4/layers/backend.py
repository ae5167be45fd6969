"""The layer-backend seam: a model asks a backend for its pieces and never names a layer class.

One model definition (``models/phi4/model.py``) runs on plain PyTorch layers (``local``) or on
fused GPU layers (Transformer Engine, FP8) by asking a ``LayerBackend`` for each piece, as
megatron-core's ``BackendSpecProvider`` does. The pieces are cut where the fused GPU kernels cut:

================  ============================================================  =====================
piece             computes                                                      tensor parallelism
================  ============================================================  =====================
``embedding``     token ids -> hidden                                           vocabulary rows
``norm``          RMSNorm (the final norm)                                      replicated
``norm_linear``   RMSNorm fused into several projections of its output          column (output rows)
``linear``        one projection                                                "column" or "row"
``core_attention``softmax(q k^T / sqrt(d)) v for GQA, causal, packed documents  local heads
``norm_mlp``      RMSNorm + SwiGLU MLP: down(silu(gate(n)) * up(n))             column in, row out
``lm_head``       hidden -> logits of this rank's vocabulary shard              vocabulary rows
================  ============================================================  =====================

Every module a backend returns declares its parameters through ``param_layout()`` (see
``megatron_phi4.distributed.sharding``) using *roles* (``norm``, ``q_proj``, ``gate_proj``...),
which the model maps to its stable checkpoint names. A backend's modules therefore may fuse,
reorder or rename parameters freely: checkpoints load under any backend.

A backend is built for one ``ParallelContext`` (the TP group and whether sequence parallelism is
on) and registered by name in ``megatron_phi4.registry.BACKENDS`` (``model.backend``).

Precision is the backend's business too (``model.fp8``): a backend built with an enabled
``FP8Config`` may hand each decoder layer its pieces from ``for_layer(i, num_layers)`` (layers
kept in bf16 get a backend without FP8) and may wrap a forward pass of the layers in
``autocast()`` (Transformer Engine's ``autocast`` region, whose exit reduces the amaxes). Both are
optional; ``layer_backend`` / ``forward_context`` below supply the defaults.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class ParallelContext:
    """What a layer needs to know about tensor parallelism when it is built."""

    tp_group: object = None  # None: no tensor parallelism
    tp_size: int = 1
    tp_rank: int = 0
    sequence_parallel: bool = False  # residual stream split along the sequence over the TP group
    # The group FP8 amaxes are reduced over when a backend keeps per-tensor scaling state (Transformer
    # Engine's delayed scaling): TP x DP by default (Megatron's choice), None = the TP group.
    amax_group: object = None

    def __post_init__(self):
        if self.sequence_parallel and self.tp_size == 1:
            object.__setattr__(self, "sequence_parallel", False)

    @classmethod
    def from_group(cls, group, sequence_parallel: bool = False, amax_group=None) -> "ParallelContext":
        if group is None:
            return cls(amax_group=amax_group)
        import torch.distributed as dist

        return cls(group, dist.get_world_size(group), dist.get_rank(group), sequence_parallel, amax_group)


class AttentionMetadata:
    """What core attention needs to know about the batch, built once per forward pass.

    ``document_ids`` (batch, seq): packed documents (attention never crosses a change of id);
    None means one document per row. ``past`` is the number of cached positions before the
    ``seq`` new ones (incremental decoding). Backends derive what their kernel needs from it
    (a dense mask, a block mask, cu_seqlens) and may cache it here, so it is computed once per
    forward, not once per layer.
    """

    def __init__(self, seq: int, past: int = 0, document_ids: torch.Tensor | None = None,
                 device: torch.device | str | None = None):
        if document_ids is not None and past:
            raise ValueError("document_ids (packed sequences) cannot be combined with a non-empty KV cache")
        self.seq, self.past, self.document_ids = int(seq), int(past), document_ids
        self.device = torch.device(device) if device is not None else (
            document_ids.device if document_ids is not None else torch.device("cpu"))
        self.cache: dict = {}

    @property
    def causal_only(self) -> bool:
        """Plain causal attention over the whole row (no packing, no cache offset to handle)."""
        return self.document_ids is None and self.past == 0

    def cached(self, key, build):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


class LayerBackend(Protocol):
    """Factory of a model's pieces for one ``ParallelContext`` (see the module docstring)."""

    name: str
    ctx: ParallelContext

    def embedding(self, vocab_size: int, hidden: int) -> nn.Module: ...

    def norm(self, hidden: int, eps: float) -> nn.Module: ...

    def norm_linear(self, hidden: int, outputs: dict[str, int], eps: float) -> nn.Module:
        """RMSNorm then column-parallel projections named by ``outputs`` (global widths); the
        module returns a tuple of this rank's outputs in that order."""

    def linear(self, in_features: int, out_features: int, parallel: str) -> nn.Module:
        """``parallel``: "column" (input replicated or prepared by the caller) or "row" (input
        split along features; the output is reduced, or reduce-scattered under SP)."""

    def core_attention(self, num_heads: int, num_kv_heads: int, head_dim: int) -> nn.Module:
        """``(q, k, v, meta) -> out``: q (b, s, local heads, d), k/v (b, s_kv, local kv heads, d) in
        "bshd" layout, ``meta`` an AttentionMetadata; returns (b, s, local heads * d)."""

    def norm_mlp(self, hidden: int, ffn: int, eps: float) -> nn.Module: ...

    def lm_head(self, hidden: int, vocab_size: int) -> nn.Module: ...

    # Optional (see the module docstring):
    # def for_layer(self, layer_idx: int, num_layers: int) -> "LayerBackend": ...
    # def autocast(self) -> ContextManager: ...


def layer_backend(backend: LayerBackend, layer_idx: int, num_layers: int) -> LayerBackend:
    """The backend decoder layer ``layer_idx`` takes its pieces from (per-layer precision)."""
    for_layer = getattr(backend, "for_layer", None)
    return backend if for_layer is None else for_layer(layer_idx, num_layers)


def forward_context(backend: LayerBackend) -> ContextManager:
    """The context a forward pass of the decoder layers runs in (an FP8 autocast region, or none)."""
    autocast = getattr(backend, "autocast", None)
    return contextlib.nullcontext() if autocast is None else autocast()


def build_backend(name: str, ctx: ParallelContext | None = None, fp8=None) -> LayerBackend:
    """The registered backend ``name`` (``model.backend``) for ``ctx``; ``fp8``: the model's
    ``FP8Config`` (passed only when enabled, so backends without an FP8 path need not accept it)."""
    from megatron_phi4.registry import BACKENDS

    cls = BACKENDS.get(name)
    if fp8 is None or not fp8.enabled:
        return cls(ctx or ParallelContext())
    try:
        return cls(ctx or ParallelContext(), fp8=fp8)
    except TypeError as e:
        if "fp8" not in str(e):
            raise
        raise ValueError(f"model.fp8.enabled: backend {name!r} ({cls.__name__}) has no FP8 path") from None
