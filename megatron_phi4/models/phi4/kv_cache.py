"""Key/value cache for incremental decoding (Pivotal Token Search rollouts, evaluation).

Preallocated per layer so decoding never reallocates; every row of the batch shares one length,
which fits PTS (many rollouts of one prefix) and greedy evaluation. Keys and values are stored in
the "bshd" layout (batch, seq, kv heads, head_dim) that core attention takes.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layer_indices, batch_size, num_kv_heads, head_dim, max_seq_len, dtype, device):
        shape = (batch_size, max_seq_len, num_kv_heads, head_dim)
        self.max_seq_len = max_seq_len
        self.seq_len = 0
        self.keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_indices}
        self.values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_indices}

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Write the new keys/values after the cached ones; return all of them so far."""
        end = self.seq_len + k.shape[1]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_seq_len {self.max_seq_len}")
        self.keys[layer_idx][:, self.seq_len:end] = k
        self.values[layer_idx][:, self.seq_len:end] = v
        return self.keys[layer_idx][:, :end], self.values[layer_idx][:, :end]

    def advance(self, num_tokens: int) -> None:
        self.seq_len += num_tokens

    def reset(self) -> None:
        self.seq_len = 0

    def repeat_batch(self, repeats: int) -> "KVCache":
        """A cache whose rows are each row of this one repeated ``repeats`` times (branch rollouts)."""
        out = object.__new__(KVCache)
        out.max_seq_len, out.seq_len = self.max_seq_len, self.seq_len
        out.keys = {i: t.repeat_interleave(repeats, dim=0) for i, t in self.keys.items()}
        out.values = {i: t.repeat_interleave(repeats, dim=0) for i, t in self.values.items()}
        return out
