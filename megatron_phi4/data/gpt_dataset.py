"""Packed pre-training dataset over indexed datasets (own implementation of megatron's GPTDataset
guarantees; see docs/data.md for why we do not use megatron-core's class).

A dataset of ``num_samples`` samples of ``seq_length + 1`` tokens is defined by three arrays:

* **document index** (int32/int64 ``[epochs * docs]``): the kept documents (after the optional
  long-document filter ``length > min_document_tokens``), shuffled independently in every epoch
  and concatenated epoch after epoch;
* **sample index** (int64 ``[num_samples_total + 1, 2]``): row ``i`` = ``(position in the document
  index, token offset in that document)`` of global token ``i * seq_length`` of the concatenated
  stream. Sample ``i`` is the ``seq_length + 1`` tokens from row ``i`` to row ``i + 1`` inclusive,
  so consecutive samples share one token (input/label shift), across document boundaries (the EOD
  tokens are already in the data);
* **shuffle index** (``[num_samples_total]``): a permutation of the samples; as in megatron, when
  the last epoch is only partly used (< 80 % of an epoch) its samples are shuffled separately and
  placed last, so that the first ``num_samples`` entries use every full epoch exactly once.

All three are built with vectorized numpy from a ``lengths`` array alone (``build_gpt_indices``),
in chunks, so 100M documents need about 16 bytes per document (see benchmarks/index_build.py).
They are cached on disk (``cache.cached_arrays``) under a sha256 of everything that defines them.
"""
from __future__ import annotations

import os
import zlib
from typing import Dict, List, Optional

import numpy as np

from megatron_phi4.data.cache import cached_arrays, file_fingerprint
from megatron_phi4.tokenizer import EOD_ID

__all__ = [
    "INDEX_FORMAT_VERSION", "select_documents", "num_epochs_for", "build_document_index",
    "build_sample_index", "build_shuffle_index", "build_gpt_indices", "packed_position_ids",
    "tokens_in",
    "GPTDataset", "build_pretrain_dataset",
]

INDEX_FORMAT_VERSION = 1
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
_CHUNK = 1 << 22


def _rng(seed: int, *salt: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & (2**63 - 1)]
                                                                      + [int(s) for s in salt])))


def select_documents(lengths: np.ndarray, min_document_tokens: int = 0) -> np.ndarray:
    """Ids of documents kept by the long-document filter (``length > min_document_tokens``); all
    documents when the threshold is 0 (empty ones are harmless: they contribute no tokens)."""
    n = len(lengths)
    dt = np.int32 if n < 2**31 else np.int64
    if min_document_tokens > 0:
        out = np.empty(0, dt)
        parts = []
        for a in range(0, n, _CHUNK):
            c = np.asarray(lengths[a:a + _CHUNK])
            parts.append((np.flatnonzero(c > min_document_tokens) + a).astype(dt))
        return np.concatenate(parts) if parts else out
    return np.arange(n, dtype=dt)


def tokens_in(lengths: np.ndarray, documents: np.ndarray) -> int:
    tot = 0
    for a in range(0, len(documents), _CHUNK):
        tot += int(np.asarray(lengths)[documents[a:a + _CHUNK]].sum(dtype=np.int64))
    return tot


def num_epochs_for(tokens_per_epoch: int, seq_length: int, num_samples: Optional[int]) -> int:
    if num_samples is None:
        return 1
    need = int(num_samples) * seq_length + 1
    return max(1, -(-need // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, seed: int, salt: int = 0
                         ) -> np.ndarray:
    """Documents shuffled independently per epoch (each epoch from its own seeded stream)."""
    n = len(documents)
    out = np.empty(n * num_epochs, dtype=documents.dtype)
    for e in range(num_epochs):
        part = out[e * n:(e + 1) * n]
        part[:] = documents
        _rng(seed, salt, 0, e).shuffle(part)
    return out


def build_sample_index(lengths: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_samples_total: int, chunk: int = _CHUNK) -> np.ndarray:
    """Rows ``(doc-index position, offset)`` of tokens ``0, S, 2S, ..., num_samples_total*S``.

    One pass over the document index in chunks: cumulative token ends per chunk, then a
    ``searchsorted`` of the sample starts that fall in the chunk. No Python loop per document.
    """
    S = int(seq_length)
    rows = np.empty((num_samples_total + 1, 2), dtype=np.int64)
    base = 0          # tokens before this chunk
    next_i = 0        # next sample boundary to place
    lengths = np.asarray(lengths)
    for a in range(0, len(document_index), chunk):
        if next_i > num_samples_total:
            break
        lens = lengths[document_index[a:a + chunk]].astype(np.int64)
        ends = np.cumsum(lens)
        ends += base
        end_tok = int(ends[-1]) if len(ends) else base
        # boundaries i with base <= i*S < end_tok
        last_i = min((end_tok - 1) // S, num_samples_total) if end_tok > 0 else -1
        if last_i >= next_i:
            pos = np.arange(next_i, last_i + 1, dtype=np.int64) * S
            j = np.searchsorted(ends, pos, side="right")
            rows[next_i:last_i + 1, 0] = j + a
            rows[next_i:last_i + 1, 1] = pos - (ends[j] - lens[j])
            next_i = last_i + 1
        base = end_tok
    if next_i <= num_samples_total:
        raise ValueError(f"sample index: only {base} tokens for {num_samples_total} samples of "
                         f"{S}+1 tokens")
    return rows


def build_shuffle_index(num_first: int, total: int, seed: int, salt: int = 0) -> np.ndarray:
    """Permutation of ``[0, num_first)`` followed by a permutation of ``[num_first, total)``."""
    dt = np.uint32 if total < 2**32 - 1 else np.int64
    out = np.arange(total, dtype=dt)
    rng = _rng(seed, salt, 1)
    rng.shuffle(out[:num_first])
    if total > num_first:
        rng.shuffle(out[num_first:])
    return out


def build_gpt_indices(lengths: np.ndarray, seq_length: int, seed: int,
                      num_samples: Optional[int] = None, min_document_tokens: int = 0,
                      salt: int = 0) -> Dict[str, np.ndarray]:
    """All index arrays for a packed dataset, from the documents' ``lengths`` only.

    Returns ``document_index``, ``sample_index``, ``shuffle_index`` and ``meta`` (int64 array:
    num_samples, num_samples_total, num_epochs, tokens_per_epoch, num_documents_kept).
    """
    S = int(seq_length)
    if S <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    documents = select_documents(lengths, min_document_tokens)
    tpe = tokens_in(lengths, documents)
    if tpe < S + 1:
        raise ValueError(f"only {tpe} tokens in {len(documents)} documents "
                         f"(min_document_tokens={min_document_tokens}); a sample needs {S + 1}")
    epochs = num_epochs_for(tpe, S, num_samples)
    document_index = build_document_index(documents, epochs, seed, salt)
    del documents
    total = (epochs * tpe - 1) // S
    sample_index = build_sample_index(lengths, document_index, S, total)
    n = total if num_samples is None else int(num_samples)
    separate = False
    first = total
    if epochs > 1:
        sans_final = ((epochs - 1) * tpe - 1) // S
        per_epoch = (tpe - 1) // S
        separate = (n - sans_final) < int(SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)
        if separate:
            first = sans_final
    shuffle_index = build_shuffle_index(first, total, seed, salt)
    meta = np.array([n, total, epochs, tpe, len(document_index) // epochs, int(separate)], np.int64)
    return {"document_index": document_index, "sample_index": sample_index,
            "shuffle_index": shuffle_index, "meta": meta}


def packed_position_ids(tokens: np.ndarray, eod_id: int = EOD_ID):
    """``(position_ids, document_ids)`` for input tokens of a packed row: a new document starts
    after every EOD; positions restart at 0 there."""
    n = len(tokens)
    is_eod = np.asarray(tokens) == eod_id
    start = np.zeros(n, dtype=bool)
    if n:
        start[0] = True
        start[1:] = is_eod[:-1]
    doc = np.cumsum(start, dtype=np.int64) - 1
    idx = np.arange(n, dtype=np.int64)
    first = np.maximum.accumulate(np.where(start, idx, 0))
    return idx - first, doc


class GPTDataset:
    """Packed samples of ``seq_length + 1`` tokens from one indexed dataset.

    ``ds[i]`` -> ``{"tokens": int64 [S+1], "position_ids": int64 [S], "document_ids": int64 [S]}``
    (torch tensors; ``get_tokens(i)`` gives the numpy tokens). ``position_ids``/``document_ids``
    describe the *input* tokens ``tokens[:-1]`` and restart after every ``eod_id``.
    """

    def __init__(self, dataset, seq_length: int, num_samples: Optional[int] = None,
                 seed: int = 1234, min_document_tokens: int = 0, cache_dir: Optional[str] = None,
                 eod_id: int = EOD_ID, salt: int = 0, content_hash: bool = False) -> None:
        from megatron_phi4.data.indexed import IndexedDataset
        self.dataset = IndexedDataset(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
        self.seq_length = int(seq_length)
        self.eod_id = int(eod_id)
        prefix = self.dataset.path_prefix
        desc = {
            "class": "GPTDataset", "version": INDEX_FORMAT_VERSION,
            "idx": file_fingerprint(prefix + ".idx", content_hash),
            "bin_size": os.path.getsize(prefix + ".bin"),
            "seq_length": self.seq_length, "seed": int(seed), "salt": int(salt),
            "num_samples": None if num_samples is None else int(num_samples),
            "min_document_tokens": int(min_document_tokens),
        }
        self.description = desc
        lengths = self.dataset.sequence_lengths

        def build():
            return build_gpt_indices(lengths, self.seq_length, seed, num_samples,
                                     min_document_tokens, salt)

        arrs = cached_arrays(cache_dir, "gpt", desc,
                             ["document_index", "sample_index", "shuffle_index", "meta"], build)
        self.document_index = arrs["document_index"]
        self.sample_index = arrs["sample_index"]
        self.shuffle_index = arrs["shuffle_index"]
        meta = np.asarray(arrs["meta"])
        self.num_samples, self.num_samples_total, self.num_epochs = map(int, meta[:3])
        self.tokens_per_epoch, self.num_documents = int(meta[3]), int(meta[4])

    def __len__(self) -> int:
        return self.num_samples

    def get_tokens(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        i = int(self.shuffle_index[idx])
        (j0, o0), (j1, o1) = self.sample_index[i], self.sample_index[i + 1]
        j0, o0, j1, o1 = int(j0), int(o0), int(j1), int(o1)
        ds = self.dataset
        if j0 == j1:
            out = ds.get(int(self.document_index[j0]), o0, o1 - o0 + 1)
        else:
            parts = [ds.get(int(self.document_index[j0]), o0)]
            for j in range(j0 + 1, j1):
                parts.append(ds[int(self.document_index[j])])
            parts.append(ds.get(int(self.document_index[j1]), 0, o1 + 1))
            out = np.concatenate(parts)
        assert len(out) == self.seq_length + 1, (len(out), self.seq_length)
        return out.astype(np.int64)

    def __getitem__(self, idx: int) -> dict:
        import torch
        tokens = self.get_tokens(int(idx))
        pos, doc = packed_position_ids(tokens[:-1], self.eod_id)
        return {"tokens": torch.from_numpy(tokens), "position_ids": torch.from_numpy(pos),
                "document_ids": torch.from_numpy(doc)}


def build_pretrain_dataset(spec, seq_length: int, num_samples: int, seed: int = 1234,
                           cache_dir: Optional[str] = None, eod_id: int = EOD_ID,
                           min_document_tokens: int = 0, check_paths: bool = True):
    """A :class:`~megatron_phi4.data.blending.BlendedDataset` of ``num_samples`` packed samples
    over a mixture spec (a :class:`MixtureSpec` or the path of its YAML).

    Every path of every source becomes one :class:`GPTDataset`; its blend weight is the source
    weight times the path's share in the source (explicit path weights, else token counts after
    the document filter). Each GPTDataset is built with exactly the number of samples the blend
    takes from it. ``min_document_tokens`` (e.g. from the stage config) applies on top of the
    sources' own thresholds (the larger wins). ``ds.names[d]`` = ``"source/prefix"``;
    ``ds.source_of[d]`` = source index.
    """
    from megatron_phi4.data.blending import BlendedDataset, blend_counts
    from megatron_phi4.data.indexed import IndexedDataset
    from megatron_phi4.data.mixture import MixtureSpec, path_weights
    if not isinstance(spec, MixtureSpec):
        spec = MixtureSpec.from_yaml(spec, check_paths=check_paths)
    flat: List = []
    weights: List[float] = []
    names: List[str] = []
    source_of: List[int] = []
    for si, (src, sw) in enumerate(zip(spec.sources, spec.normalized_weights())):
        mdt = max(src.min_document_tokens, int(min_document_tokens))
        opened = [IndexedDataset(p.prefix) for p in src.paths]
        toks = []
        for d in opened:
            lens = d.sequence_lengths
            toks.append(int(lens.sum(dtype=np.int64)) if mdt == 0 else
                        sum(int(np.asarray(lens[a:a + _CHUNK])[np.asarray(lens[a:a + _CHUNK]) > mdt]
                                .sum(dtype=np.int64)) for a in range(0, len(lens), _CHUNK)))
        pw = path_weights(src, toks)
        for j, (d, w, t) in enumerate(zip(opened, pw, toks)):
            if w > 0 and t > 0:
                # salt: stable when other sources are added or removed
                flat.append((d, mdt, zlib.crc32(f"{src.name}/{j}".encode())))
                weights.append(sw * w)
                names.append(f"{src.name}/{d.path_prefix}")
                source_of.append(si)
    counts = blend_counts(weights, num_samples)
    datasets = [GPTDataset(d, seq_length, max(int(c), 1), seed=seed, min_document_tokens=mdt,
                           cache_dir=cache_dir, eod_id=eod_id, salt=salt)
                for (d, mdt, salt), c in zip(flat, counts)]
    blended = BlendedDataset(datasets, weights, num_samples, names=names)
    blended.source_of = source_of
    blended.spec = spec
    return blended
