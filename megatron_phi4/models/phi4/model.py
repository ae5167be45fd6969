"""The Phi-4 decoder as plain, single-device PyTorch.

The model asks a layer backend (``megatron_phi4.layers``) for its pieces -- the embedding, RMSNorm
fused into the Q/K/V projections, core attention, the output projection, RMSNorm + SwiGLU MLP, the
final norm and the LM head -- and never names a layer class, so the same definition runs on plain
PyTorch layers or on fused GPU layers, in one process or under tensor/sequence parallelism (the
backend is built for the TP group). Pipeline parallelism builds a model holding only some layers
(``layer_ids``), without the embedding or the head: the forward pass therefore accepts hidden
states instead of token ids and returns hidden states where there is no head.

Checkpoint names do not depend on the backend: ``state_dict()`` / ``load_state_dict()`` speak the
stable names of ``state_dict.py`` (``layers.3.attention.q_proj.weight``, ...), whatever fused or
renamed parameters a backend uses internally.

Q, K and V are separate projections (HF fuses them as ``qkv_proj``): splitting each one contiguously
by heads hands every tensor-parallel rank whole query groups, so no reordering is ever needed.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from megatron_phi4.config import ModelConfig
from megatron_phi4.layers.backend import (
    AttentionMetadata, LayerBackend, build_backend, forward_context, layer_backend,
)
from megatron_phi4.models.phi4 import state_dict as names
from megatron_phi4.models.phi4.kv_cache import KVCache


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables of shape (batch, seq, head_dim) for the rotate-half RoPE form.

    Computed from the positions on every call (cheap next to attention) so the RoPE base can change
    between training stages and nothing stale survives a meta-device build.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim)
    )
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos/sin: (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; the input RMSNorm is fused into the Q/K/V piece."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: LayerBackend):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, cfg.head_dim
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv = backend.norm_linear(cfg.hidden_size, {"q_proj": q, "k_proj": kv, "v_proj": kv}, cfg.norm_eps)
        self.core = backend.core_attention(cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim)
        self.o_proj = backend.linear(q, cfg.hidden_size, parallel="row")

    def forward(self, x, cos, sin, meta: AttentionMetadata, kv_cache: KVCache | None = None):
        q, k, v = self.qkv(x)
        batch, seq = q.shape[:2]
        q, k, v = (t.view(batch, seq, -1, self.head_dim) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        return self.o_proj(self.core(q, k, v, meta))


class DecoderBlock(nn.Module):
    """``x + attention(norm(x))``, then ``x + mlp(norm(x))`` (the norms live inside the pieces)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: LayerBackend):
        super().__init__()
        self.attention = Attention(cfg, layer_idx, backend)
        self.mlp = backend.norm_mlp(cfg.hidden_size, cfg.intermediate_size, cfg.norm_eps)

    def forward(self, x, cos, sin, meta, kv_cache=None):
        x = x + self.attention(x, cos, sin, meta, kv_cache)
        return x + self.mlp(x)


class Phi4Model(nn.Module):
    """Token embedding -> pre-norm decoder blocks -> final RMSNorm -> untied LM head.

    ``backend``: a LayerBackend (default: ``cfg.backend`` without tensor parallelism).
    ``layer_ids``: the decoder layers this module holds (default all); ``layers`` is a ModuleDict
    keyed by the global layer index, so a pipeline stage keeps the names (and checkpoint keys) of
    the layers it owns. ``embedding`` / ``head``: whether it holds the embedding / final norm + head.
    """

    def __init__(self, cfg: ModelConfig, backend: LayerBackend | None = None, *,
                 layer_ids: Iterable[int] | None = None, embedding: bool = True, head: bool = True):
        super().__init__()
        backend = backend if backend is not None else build_backend(cfg.backend, fp8=cfg.fp8)
        self.config = cfg
        self._backend = backend  # for its forward context (an FP8 autocast region); holds no parameters
        self.rope_theta = cfg.rope_theta
        layer_ids = range(cfg.num_layers) if layer_ids is None else layer_ids
        self.embed_tokens = backend.embedding(cfg.vocab_size, cfg.hidden_size) if embedding else None
        # each layer takes its pieces from the backend for that layer (FP8, or bf16 for kept end layers)
        self.layers = nn.ModuleDict({str(i): DecoderBlock(cfg, i, layer_backend(backend, i, cfg.num_layers))
                                     for i in layer_ids})
        self.norm = backend.norm(cfg.hidden_size, cfg.norm_eps) if head else None
        self.lm_head = backend.lm_head(cfg.hidden_size, cfg.vocab_size) if head else None
        self._layout = None
        names.install_state_dict_hooks(self)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab) -- or hidden states where this module lacks the head.

        tokens: token ids (batch, seq), or hidden states (batch, seq, hidden) on a pipeline stage
            without the embedding.
        position_ids: (batch, seq); default 0..seq-1, or continuing from the KV cache. For packed
            sequences they restart at every document.
        document_ids: (batch, seq) ids that differ between packed documents; attention never
            crosses a change of id. None means one document per row.
        kv_cache: incremental decoding state; the new keys/values are appended and the cache
            advanced by ``seq``.
        """
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        batch = h.shape[0]
        seq = tokens.shape[1] if position_ids is None else position_ids.shape[1]
        past = kv_cache.seq_len if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=h.device).expand(batch, seq)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.rope_theta, h.dtype)
        meta = AttentionMetadata(seq, past, document_ids, device=h.device)
        with forward_context(self._backend):
            for layer in self.layers.values():
                h = layer(h, cos, sin, meta, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(seq)
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is not None:
            h = self.lm_head(h)
        return h

    def set_rope_theta(self, theta: float) -> None:
        self.rope_theta = float(theta)

    def checkpoint_layout(self):
        """{local parameter FQN: pieces named by their stable checkpoint names} (cached)."""
        if self._layout is None:
            self._layout = names.param_layout(self)
        return self._layout

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Draw every tensor with ``init_parameter_`` in checkpoint-name order (``state_dict.py``)
        from one generator, so a seed fixes the whole model; parallel runs that must match a
        single-process run draw the same full tensors in the same order and keep their slice."""
        views = self.state_dict()  # views of the parameters under their checkpoint names
        for name in names.global_shapes(self.config):
            if name in views:
                init_parameter_(name, views[name], self.config, generator)

    def create_kv_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> KVCache:
        ref = next(self.parameters())
        core = next(iter(self.layers.values())).attention.core
        return KVCache(
            layer_indices=[int(i) for i in self.layers.keys()],
            batch_size=batch_size,
            num_kv_heads=core.num_kv_heads,
            head_dim=self.config.head_dim,
            max_seq_len=max_seq_len,
            dtype=dtype or ref.dtype,
            device=device or ref.device,
        )


@torch.no_grad()
def init_parameter_(name: str, tensor: torch.Tensor, cfg: ModelConfig, generator=None) -> torch.Tensor:
    """Megatron's scheme: N(0, init_std) everywhere, the output projection of each residual branch
    scaled by 1/sqrt(2 * num_layers) (keeps the residual stream's variance flat with depth), norms at one.
    ``name`` is the checkpoint name."""
    if name.endswith("norm.weight"):
        return tensor.fill_(1.0)
    std = cfg.init_std
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std = std / math.sqrt(2.0 * cfg.num_layers)
    return tensor.normal_(0.0, std, generator=generator)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int | None = 0,
                backend: LayerBackend | None = None) -> Phi4Model:
    """Build on the meta device (no memory), then materialize on ``device`` and initialize."""
    with torch.device("meta"):
        model = Phi4Model(cfg, backend)
    model.to_empty(device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    model.init_weights(generator)
    return model


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count, computed on the meta device without allocating anything."""
    with torch.device("meta"):
        model = Phi4Model(cfg)
    return sum(p.numel() for p in model.parameters())
