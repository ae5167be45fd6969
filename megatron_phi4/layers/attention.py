"""Core attention of the local backend: ``softmax(q k^T / sqrt(d)) v`` for GQA, never with an [S, S] mask.

A dense boolean mask costs S^2 bytes per row (268 MB at 16K) and rules out the fused kernels, which
then fall back to materializing the S x S score matrix per head. Instead each kind of batch goes to
a kernel that needs no mask; which one is decided once per forward from the ``AttentionMetadata``:

=========================================  ==========================================================
batch                                      kernel (memory)
=========================================  ==========================================================
one document per row (``document_ids``     ``scaled_dot_product_attention(is_causal=True)``: flash /
None, or one id per row -- SFT and DPO     memory-efficient on CUDA, the flash kernel on CPU (O(S))
collates give zeros)
packed documents                           causal SDPA per document, a loop over the segments of
                                           ``AttentionMetadata.documents()`` (the same kernels; O(S))
decoding one token after a KV cache        SDPA without a mask (the token sees everything cached)
decoding a chunk of tokens after a cache   SDPA with the bottom-right causal bias
                                           (``causal_lower_right``): a flash / memory-efficient kernel
                                           on CUDA; on CPU torch materializes a seq x (past + seq)
                                           mask -- linear in the context for a fixed chunk
=========================================  ==========================================================

Why segments for packed documents (measured with ``benchmarks/attention_kernels.py``, numbers in
docs/model.md): FlexAttention with a document-causal ``BlockMask`` (O((S/128)^2)) has no backward
on CPU in torch 2.13 (``NotImplementedError``, eager and compiled), and on an H200 (torch 2.11,
bf16, 16K tokens in 8 documents, Phi-4's 40/10 heads) the compiled FlexAttention took 13.0 ms for
forward + backward against 7.0 ms for the segments (the dense mask: 63 ms). Flash-attention's
varlen kernel (``torch.nn.attention.varlen``, one launch over ``cu_seqlens``, which
``documents()`` also provides) has no grouped-query support in torch 2.11, so it was not measured;
it is the candidate to replace the loop for rows of many short documents, where the loop's launches
dominate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from megatron_phi4.layers.backend import AttentionMetadata, DocumentSegments, ParallelContext


class SDPAttention(nn.Module):
    """Grouped-query attention: query head h reads KV head h // (heads / kv_heads) (``enable_gqa``).
    Takes q (b, s, heads, d), k/v (b, s_kv, kv heads, d) ("bshd"); returns (b, s, heads * d)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, ctx: ParallelContext):
        super().__init__()
        for what, n in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if n % ctx.tp_size:
                raise ValueError(f"attention: {what}={n} is not divisible by the tensor-parallel size {ctx.tp_size}")
        self.num_heads, self.num_kv_heads = num_heads // ctx.tp_size, num_kv_heads // ctx.tp_size
        self.head_dim = head_dim

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        batch, seq = q.shape[:2]
        if meta.document_ids is not None and not meta.causal_only:
            out = packed_document_attention(q, k, v, meta.documents())
        else:
            out = causal_attention(q, k, v, meta.past)
        return out.reshape(batch, seq, -1)

    def param_layout(self):
        return {}


def causal_attention(q, k, v, past: int = 0) -> torch.Tensor:
    """Causal attention of each row as one document; the ``seq`` queries are the last positions of
    the ``past + seq`` keys. Returns (b, s, heads, d)."""
    seq = q.shape[1]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # bshd -> bhsd (views)
    if past == 0:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=seq > 1, enable_gqa=True)
    elif seq == 1:
        out = F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)
    else:  # new queries at the end of the key range: bottom-right aligned causal
        bias = causal_lower_right(seq, past + seq)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, enable_gqa=True)
    return out.transpose(1, 2)


def packed_document_attention(q, k, v, docs: DocumentSegments) -> torch.Tensor:
    """Causal attention within each packed document, none across them. Returns (b, s, heads, d)."""
    batch, seq, heads, dim = q.shape
    flat = [t.reshape(batch * seq, t.shape[2], dim) for t in (q, k, v)]  # (tokens, heads, d)
    out = torch.cat([_one_document(*(t[s:e] for t in flat)) for s, e in docs.bounds])
    return out.view(batch, seq, heads, dim)


def _one_document(q, k, v) -> torch.Tensor:
    """(n, heads, d) -> causal SDPA over the n tokens of one document -> (n, heads, d)."""
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)[0].transpose(0, 1)


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Reference only (tests, the step-memory benchmark's baseline): the dense boolean (batch, 1, seq,
    seq) mask, True where attention is allowed -- causal and within a document. O(S^2)."""
    seq = document_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    return (same_doc & causal)[:, None]
