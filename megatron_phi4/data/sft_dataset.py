"""Packed SFT dataset over the ``PREFIX_tokens`` / ``PREFIX_loss_mask`` pairs of preprocess_chat.

Whole conversations are packed into rows of ``seq_length + 1`` tokens: conversations are visited
in a deterministic shuffled order (seeded, one shuffle per epoch) and placed by **first-fit** into
the earliest-opened bin with room, among at most ``max_open_bins`` open bins (when none fits and
the window is full, the oldest bin is closed; this bounds the cost at O(window) per conversation,
and with a few hundred open bins packing efficiency is within a fraction of a percent of
unbounded first-fit). A conversation longer than the row is truncated to ``seq_length + 1``
tokens and fills a row alone (counted in ``num_truncated``). Rows are padded with ``pad_id``
(:data:`~megatron_phi4.tokenizer.PAD_ID`) whose loss mask is 0.

``ds[i]`` -> ``tokens`` int64 [S+1], ``loss_mask`` int64 [S] (the conversation mask shifted by one:
``loss_mask[t]`` says whether label ``tokens[t+1]`` is trained), ``position_ids`` int64 [S]
restarting at every conversation (and at the padding), ``document_ids`` int64 [S] (0, 1, ... per
conversation, padding its own id) so attention never crosses conversations.

The packing (conversation order and row boundaries) is cached like the pre-training indices.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

import numpy as np

from megatron_phi4.data.cache import cached_arrays, file_fingerprint
from megatron_phi4.tokenizer import PAD_ID

__all__ = ["SFTDataset", "pack_first_fit"]

SFT_FORMAT_VERSION = 1


def pack_first_fit(lengths: np.ndarray, capacity: int, max_open_bins: int = 256):
    """First-fit packing of items (in the given order) into bins of ``capacity``.

    Items longer than ``capacity`` count as ``capacity``. Returns ``(order, offsets)``: item
    positions grouped by bin (bins in opening order, items in arrival order) and
    ``offsets[b]:offsets[b+1]`` delimiting bin ``b``.
    """
    lens = np.minimum(np.asarray(lengths, dtype=np.int64), capacity)
    n = len(lens)
    W = max(1, int(max_open_bins))
    caps = np.full(W, -1, dtype=np.int64)          # remaining room; -1 = free slot
    slot_bin = np.full(W, -1, dtype=np.int64)      # bin id held by each slot
    big = np.iinfo(np.int64).max
    assign = np.empty(n, dtype=np.int64)
    nb = 0
    for i, L in enumerate(lens.tolist()):
        ok = caps >= L
        if ok.any():
            j = int(np.where(ok, slot_bin, big).argmin())   # earliest-opened bin that fits
            caps[j] -= L
            assign[i] = slot_bin[j]
        else:
            j = int(slot_bin.argmin())                      # a free slot, else the oldest bin
            slot_bin[j] = nb
            caps[j] = capacity - L
            assign[i] = nb
            nb += 1
    order = np.argsort(assign, kind="stable")
    offsets = np.zeros(nb + 1, dtype=np.int64)
    np.cumsum(np.bincount(assign, minlength=nb), out=offsets[1:])
    return order.astype(np.int64), offsets


class SFTDataset:
    """Packed chat conversations; see the module docstring. ``prefixes``: one or more ``PREFIX``
    (without ``_tokens``/``_loss_mask``). ``num_samples``: rows wanted (more epochs are packed,
    each with its own shuffle, until there are enough); ``None`` = one epoch."""

    def __init__(self, prefixes: Union[str, Sequence[str]], seq_length: int, seed: int = 1234,
                 num_samples: Optional[int] = None, pad_id: int = PAD_ID,
                 cache_dir: Optional[str] = None, max_open_bins: int = 256) -> None:
        from megatron_phi4.data.indexed import IndexedDataset, IndexedDatasetError
        if isinstance(prefixes, (str, os.PathLike)):
            prefixes = [prefixes]
        self.prefixes = [str(p) for p in prefixes]
        if not self.prefixes:
            raise ValueError("SFTDataset: no dataset prefixes")
        self.seq_length = int(seq_length)
        self.pad_id = int(pad_id)
        self.tokens: List = []
        self.masks: List = []
        lens = []
        fps = []
        for p in self.prefixes:
            t = IndexedDataset(p + "_tokens")
            m = IndexedDataset(p + "_loss_mask")
            if len(t) != len(m) or not np.array_equal(t.sequence_lengths, m.sequence_lengths):
                raise IndexedDatasetError(
                    f"{p}_tokens / {p}_loss_mask: the pair has different conversation counts or "
                    f"lengths ({len(t)} vs {len(m)} sequences); rerun preprocess_chat")
            self.tokens.append(t)
            self.masks.append(m)
            lens.append(np.asarray(t.sequence_lengths, dtype=np.int64))
            fps.append([file_fingerprint(p + "_tokens.idx"), file_fingerprint(p + "_loss_mask.idx")])
        self.lengths = np.concatenate(lens)
        self.conv_offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in lens], out=self.conv_offsets[1:])
        n = len(self.lengths)
        if n == 0:
            raise ValueError(f"SFTDataset: no conversations in {self.prefixes}")
        cap = self.seq_length + 1
        desc = {"class": "SFTDataset", "version": SFT_FORMAT_VERSION, "files": fps,
                "seq_length": self.seq_length, "seed": int(seed),
                "num_samples": None if num_samples is None else int(num_samples),
                "max_open_bins": int(max_open_bins)}

        def build():
            orders, offs, base_items = [], [np.zeros(1, np.int64)], 0
            rows, epoch = 0, 0
            while True:
                perm = np.random.Generator(np.random.PCG64(
                    np.random.SeedSequence([int(seed), 2, epoch]))).permutation(n)
                order, off = pack_first_fit(self.lengths[perm], cap, max_open_bins)
                orders.append(perm[order])
                offs.append(off[1:] + base_items)
                base_items += n
                rows += len(off) - 1
                epoch += 1
                if num_samples is None or rows >= num_samples:
                    break
            return {"items": np.concatenate(orders), "offsets": np.concatenate(offs),
                    "meta": np.array([rows, epoch], np.int64)}

        arrs = cached_arrays(cache_dir, "sft", desc, ["items", "offsets", "meta"], build)
        self.items, self.offsets = arrs["items"], arrs["offsets"]
        rows, self.num_epochs = (int(x) for x in np.asarray(arrs["meta"]))
        self.num_rows = rows
        self.num_samples = rows if num_samples is None else int(num_samples)
        self.num_truncated = int((self.lengths > cap).sum())  # per epoch
        self.num_conversations = n

    def __len__(self) -> int:
        return self.num_samples

    def _conv(self, c: int):
        f = int(np.searchsorted(self.conv_offsets, c, side="right") - 1)
        k = c - int(self.conv_offsets[f])
        return self.tokens[f][k], self.masks[f][k]

    def get_arrays(self, idx: int):
        """numpy ``(tokens [S+1], mask [S+1], position_ids [S+1], document_ids [S+1])``."""
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        cap = self.seq_length + 1
        tokens = np.full(cap, self.pad_id, dtype=np.int64)
        mask = np.zeros(cap, dtype=np.int64)
        pos = np.zeros(cap, dtype=np.int64)
        doc = np.zeros(cap, dtype=np.int64)
        a, b = int(self.offsets[idx]), int(self.offsets[idx + 1])
        at = 0
        for d, c in enumerate(self.items[a:b]):
            t, m = self._conv(int(c))
            L = min(len(t), cap - at)
            tokens[at:at + L] = t[:L]
            mask[at:at + L] = m[:L]
            pos[at:at + L] = np.arange(L)
            doc[at:at + L] = d
            at += L
        if at < cap:
            pos[at:] = np.arange(cap - at)
            doc[at:] = b - a
        return tokens, mask, pos, doc

    def __getitem__(self, idx: int) -> dict:
        import torch
        tokens, mask, pos, doc = self.get_arrays(int(idx))
        return {"tokens": torch.from_numpy(tokens),
                "loss_mask": torch.from_numpy(np.ascontiguousarray(mask[1:])),
                "position_ids": torch.from_numpy(np.ascontiguousarray(pos[:-1])),
                "document_ids": torch.from_numpy(np.ascontiguousarray(doc[:-1]))}

    def packing_stats(self) -> dict:
        used = np.minimum(self.lengths, self.seq_length + 1).sum() * self.num_epochs
        return {"conversations": self.num_conversations, "rows": self.num_rows,
                "epochs": self.num_epochs, "truncated_per_epoch": self.num_truncated,
                "fill": float(used) / (self.num_rows * (self.seq_length + 1))}
