"""The Phi-4 decoder as plain, single-device PyTorch.

Parallelism is never written into this file: tensor, sequence and pipeline parallelism are applied
afterwards by the functions in ``megatron_phi4.distributed`` (which swap linear layers for parallel
ones, or delete the layers a pipeline stage does not own). The forward pass therefore tolerates a
missing embedding (a later pipeline stage receives hidden states), and a missing final norm or head
(an earlier stage returns hidden states).

Q, K and V are separate projections (HF fuses them as ``qkv_proj``): splitting each one contiguously
by heads hands every tensor-parallel rank whole query groups, so no reordering is ever needed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_phi4.config import ModelConfig
from megatron_phi4.models.phi4.kv_cache import KVCache


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; the weight is applied after casting back, as in the release."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


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
    """x: (batch, heads, seq, head_dim); cos/sin: (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, 1, seq, seq) mask, True where attention is allowed: causal and within a document."""
    seq = document_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    return (same_doc & causal)[:, None]


class Attention(nn.Module):
    """Grouped-query attention; query head h reads key/value head h // (heads / kv_heads)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        # The local head counts shrink under tensor parallelism; the TP plan rewrites them.
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache: KVCache | None = None):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        out = self.core_attention(q, k, v, attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    def core_attention(self, q, k, v, attn_mask):
        """softmax(q k^T / sqrt(d)) v; a separate method so selective recompute can wrap just this."""
        if attn_mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg, layer_idx)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None):
        x = x + self.attention(self.input_norm(x), cos, sin, attn_mask, kv_cache)
        return x + self.mlp(self.post_attention_norm(x))


class Phi4Model(nn.Module):
    """Token embedding -> pre-norm decoder blocks -> final RMSNorm -> untied LM head.

    ``layers`` is a ModuleDict keyed by the global layer index, so a pipeline stage that deletes
    the layers it does not own keeps the names (and checkpoint keys) of the ones it does.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.rope_theta = cfg.rope_theta
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderBlock(cfg, i) for i in range(cfg.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

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
        batch, seq = h.shape[:2]
        past = kv_cache.seq_len if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=h.device).expand(batch, seq)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.rope_theta, h.dtype)
        attn_mask = self._attention_mask(document_ids, seq, past, h.device)
        for layer in self.layers.values():
            h = layer(h, cos, sin, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(seq)
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is not None:
            h = self.lm_head(h)
        return h

    @staticmethod
    def _attention_mask(document_ids, seq: int, past: int, device) -> torch.Tensor | None:
        if document_ids is not None:
            if past:
                raise ValueError("document_ids (packed sequences) cannot be combined with a non-empty KV cache")
            return document_causal_mask(document_ids)
        if past and seq > 1:
            # New queries sit at the end of the key range: bottom-right aligned causal mask.
            return torch.ones(seq, past + seq, dtype=torch.bool, device=device).tril(diagonal=past)
        return None  # plain causal (or a single decoded token that sees everything)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Draw every parameter with ``init_parameter_`` in ``named_parameters`` order from one
        generator, so a seed fixes the whole model; parallel runs that must match a single-process
        run draw the same full tensors in the same order and keep their slice."""
        for name, param in self.named_parameters():
            init_parameter_(name, param, self.config, generator)

    def create_kv_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> KVCache:
        ref = next(self.parameters())
        attn = next(iter(self.layers.values())).attention
        return KVCache(
            layer_indices=[int(i) for i in self.layers.keys()],
            batch_size=batch_size,
            num_kv_heads=attn.k_proj.out_features // self.config.head_dim,
            head_dim=self.config.head_dim,
            max_seq_len=max_seq_len,
            dtype=dtype or ref.dtype,
            device=device or ref.device,
        )


@torch.no_grad()
def init_parameter_(name: str, tensor: torch.Tensor, cfg: ModelConfig, generator=None) -> torch.Tensor:
    """Megatron's scheme: N(0, init_std) everywhere, the output projection of each residual branch
    scaled by 1/sqrt(2 * num_layers) (keeps the residual stream's variance flat with depth), norms at one."""
    if name.endswith("norm.weight"):
        return tensor.fill_(1.0)
    std = cfg.init_std
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std = std / math.sqrt(2.0 * cfg.num_layers)
    return tensor.normal_(0.0, std, generator=generator)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int | None = 0) -> Phi4Model:
    """Build on the meta device (no memory), then materialize on ``device`` and initialize."""
    with torch.device("meta"):
        model = Phi4Model(cfg)
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
