"""A trimmed vocabulary: the few hundred Phi-4 token ids a small task uses, renumbered 0..K-1.

Why: on a CPU the 100352-wide embedding and LM head dominate a tiny model's step (the head's
matmul and softmax alone hold it near 300 tokens/s for a 4-layer, 128-wide body; the same body on
a ~1.3K vocabulary trains at ~7.5K tokens/s, measured with the trainer on this machine). A task
that only ever writes digits, a few words and the chat tokens needs none of the other rows.

:class:`TrimmedVocab` is the map. Trimmed id ``i`` stands for Phi-4 id ``phi4_ids[i]`` (kept in
increasing Phi-4 order, so the map is monotone); the model has ``vocab_size >= len(phi4_ids)``
rows, rounded up to a multiple of ``pad_to_multiple_of`` (64) so the vocabulary splits evenly
over tensor-parallel ranks, as Megatron pads its vocabulary. The extra rows stand for no Phi-4
token: :meth:`TrimmedVocab.to_phi4` refuses them, as :meth:`TrimmedVocab.to_trimmed` refuses a
Phi-4 id outside the map, with an error naming the id and its position.

The map is saved as JSON (atomic write) beside the data it encoded and the checkpoints trained on
it. Going back to the full vocabulary is :func:`megatron_phi4.demo.vocab_export.expand_checkpoint`.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional, Sequence

import numpy as np

from megatron_phi4.fileio import atomic_write_json
from megatron_phi4.tokenizer import PHI4_SPECIAL_TOKENS, PHI4_VOCAB_SIZE

__all__ = ["TrimmedVocab", "VocabMapError", "VOCAB_FILE", "REQUIRED_SPECIAL_TOKENS", "trim_indexed_dataset"]

VOCAB_FILE = "vocab.json"
FORMAT = "megatron_phi4.trimmed_vocab"
VERSION = 1
# Always in the map: the chat control tokens, end-of-document and the padding token.
REQUIRED_SPECIAL_TOKENS = ("<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>", "<|dummy_85|>")


class VocabMapError(ValueError):
    """A token id has no counterpart in the other vocabulary, or a vocab file is invalid.
    ``position``: index of the offending id in the input, where there is one."""

    def __init__(self, message: str, position: Optional[int] = None) -> None:
        super().__init__(message)
        self.position = position


class TrimmedVocab:
    """Bijection between the used Phi-4 ids and trimmed ids ``0..num_used-1`` (see module doc)."""

    def __init__(self, phi4_ids: Sequence[int], vocab_size: Optional[int] = None,
                 phi4_vocab_size: int = PHI4_VOCAB_SIZE, source: str = "<memory>") -> None:
        ids = np.asarray(list(phi4_ids), dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise VocabMapError(f"{source}: phi4_ids must be a non-empty list of token ids")
        if (np.diff(ids) <= 0).any():
            raise VocabMapError(f"{source}: phi4_ids must be strictly increasing (sorted, no duplicates)")
        if ids[0] < 0 or ids[-1] >= phi4_vocab_size:
            raise VocabMapError(f"{source}: phi4_ids must lie in [0, {phi4_vocab_size}), got "
                                f"[{ids[0]}, {ids[-1]}]")
        vocab_size = int(ids.size if vocab_size is None else vocab_size)
        if vocab_size < ids.size:
            raise VocabMapError(f"{source}: vocab_size {vocab_size} < number of mapped ids {ids.size}")
        self.phi4_ids = ids
        self.vocab_size = vocab_size
        self.phi4_vocab_size = int(phi4_vocab_size)
        self._to_trimmed = np.full(self.phi4_vocab_size, -1, dtype=np.int64)
        self._to_trimmed[ids] = np.arange(ids.size)
        missing = [t for t in REQUIRED_SPECIAL_TOKENS if self._to_trimmed[PHI4_SPECIAL_TOKENS[t]] < 0]
        if missing:
            raise VocabMapError(f"{source}: the map lacks required special tokens {missing}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_token_ids(cls, id_lists: Iterable[Iterable[int]], extra_ids: Iterable[int] = (),
                       pad_to_multiple_of: int = 64) -> "TrimmedVocab":
        """The map of every id in ``id_lists`` (Phi-4 ids: all the task's tokenized text), plus
        ``extra_ids`` and :data:`REQUIRED_SPECIAL_TOKENS`; rows padded to ``pad_to_multiple_of``."""
        used = np.zeros(PHI4_VOCAB_SIZE, dtype=bool)
        for ids in id_lists:
            a = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
            if a.size and (a.min() < 0 or a.max() >= PHI4_VOCAB_SIZE):
                raise VocabMapError(f"token id outside the Phi-4 vocabulary [0, {PHI4_VOCAB_SIZE}) "
                                    f"in the input: [{a.min()}, {a.max()}]")
            used[a] = True
        for i in extra_ids:
            used[int(i)] = True
        for t in REQUIRED_SPECIAL_TOKENS:
            used[PHI4_SPECIAL_TOKENS[t]] = True
        ids = np.flatnonzero(used)
        m = max(1, int(pad_to_multiple_of))
        return cls(ids, vocab_size=-(-ids.size // m) * m)

    # ------------------------------------------------------------------ properties
    @property
    def num_used(self) -> int:
        """Trimmed ids that stand for a Phi-4 token (``vocab_size - num_used`` are padding rows)."""
        return int(self.phi4_ids.size)

    def _special(self, name: str) -> int:
        return int(self._to_trimmed[PHI4_SPECIAL_TOKENS[name]])

    @property
    def pad_id(self) -> int:
        return self._special("<|dummy_85|>")

    @property
    def eod_id(self) -> int:
        return self._special("<|endoftext|>")

    @property
    def im_start_id(self) -> int:
        return self._special("<|im_start|>")

    @property
    def im_end_id(self) -> int:
        return self._special("<|im_end|>")

    @property
    def stop_token_ids(self) -> List[int]:
        """End of turn and end of document, in trimmed ids (what generation stops at)."""
        return [self.im_end_id, self.eod_id]

    def __len__(self) -> int:
        return self.vocab_size

    def __eq__(self, other) -> bool:
        return (isinstance(other, TrimmedVocab) and self.vocab_size == other.vocab_size
                and np.array_equal(self.phi4_ids, other.phi4_ids))

    def __repr__(self) -> str:
        return f"TrimmedVocab(num_used={self.num_used}, vocab_size={self.vocab_size})"

    # ------------------------------------------------------------------ mapping
    def trimmed_array(self, phi4_ids) -> np.ndarray:
        """:meth:`to_trimmed` as an int64 numpy array (no Python list)."""
        a = np.asarray(phi4_ids, dtype=np.int64).reshape(-1)
        bad = (a < 0) | (a >= self.phi4_vocab_size)
        out = np.where(bad, -1, self._to_trimmed[np.where(bad, 0, a)])
        if (out < 0).any():
            pos = int(np.flatnonzero(out < 0)[0])
            raise VocabMapError(f"Phi-4 token id {int(a[pos])} (position {pos}) is not in the trimmed "
                                f"vocabulary ({self.num_used} ids); the text uses a token the task's "
                                "vocabulary was not built from", pos)
        return out

    def to_trimmed(self, phi4_ids) -> List[int]:
        """Trimmed ids of Phi-4 ids; :class:`VocabMapError` names the first id outside the map."""
        return self.trimmed_array(phi4_ids).tolist()

    def to_phi4(self, trimmed_ids) -> List[int]:
        """Phi-4 ids of trimmed ids; :class:`VocabMapError` names the first padding row or id
        outside ``[0, vocab_size)``."""
        a = np.asarray(trimmed_ids, dtype=np.int64).reshape(-1)
        bad = (a < 0) | (a >= self.num_used)
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            what = ("a padding row that stands for no Phi-4 token" if 0 <= a[pos] < self.vocab_size
                    else f"outside [0, {self.vocab_size})")
            raise VocabMapError(f"trimmed token id {int(a[pos])} (position {pos}) is {what}; mapped "
                                f"ids are [0, {self.num_used})", pos)
        return self.phi4_ids[a].tolist()

    def decode(self, trimmed_ids, tokenizer=None, errors: str = "raise") -> str:
        """Text of trimmed ids (via :meth:`to_phi4` and the Phi-4 tokenizer). ``errors="replace"``
        renders unmapped ids as U+FFFD instead of raising (for scoring model output)."""
        from megatron_phi4.tokenizer import get_tokenizer
        tok = tokenizer or get_tokenizer()
        if errors == "raise":
            return tok.decode(self.to_phi4(trimmed_ids))
        if errors != "replace":
            raise ValueError(f"errors: got {errors!r}, allowed: 'raise', 'replace'")
        parts, run = [], []
        for t in np.asarray(trimmed_ids, dtype=np.int64).reshape(-1).tolist():
            if 0 <= t < self.num_used:
                run.append(int(self.phi4_ids[t]))
            else:
                parts.append(tok.decode(run))
                parts.append("\ufffd")
                run = []
        parts.append(tok.decode(run))
        return "".join(parts)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "phi4_vocab_size": self.phi4_vocab_size,
                "vocab_size": self.vocab_size, "num_used": self.num_used,
                "special": {t: self._special(t) for t in REQUIRED_SPECIAL_TOKENS},
                "phi4_ids": self.phi4_ids.tolist()}

    def save(self, path: str | os.PathLike) -> str:
        """Write the map as JSON atomically (temporary file + rename); returns the path. A
        directory path gets :data:`VOCAB_FILE` inside it."""
        path = str(path)
        if os.path.isdir(path):
            path = os.path.join(path, VOCAB_FILE)
        atomic_write_json(path, self.to_dict(), indent=None)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrimmedVocab":
        """Read a map written by :meth:`save` (a file, or a directory holding :data:`VOCAB_FILE`)."""
        path = str(path)
        if os.path.isdir(path):
            path = os.path.join(path, VOCAB_FILE)
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise VocabMapError(f"{path}: no trimmed-vocabulary file") from None
        except json.JSONDecodeError as e:
            raise VocabMapError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise VocabMapError(f"{path}: not a trimmed-vocabulary file (format must be {FORMAT!r})")
        if d.get("version") != VERSION:
            raise VocabMapError(f"{path}: version {d.get('version')!r} is not supported (reads {VERSION})")
        for k in ("phi4_ids", "vocab_size", "phi4_vocab_size"):
            if k not in d:
                raise VocabMapError(f"{path}: field {k!r} is missing")
        ids = d["phi4_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise VocabMapError(f"{path}: phi4_ids must be a list of integers")
        return cls(ids, vocab_size=int(d["vocab_size"]), phi4_vocab_size=int(d["phi4_vocab_size"]),
                   source=path)


def trim_indexed_dataset(src_prefix: str, dst_prefix: str, vocab: TrimmedVocab,
                         map_ids: bool = True, chunk_tokens: int = 1 << 22) -> int:
    """Rewrite the indexed dataset ``src_prefix`` (Phi-4 ids, e.g. from ``preprocess``) as
    ``dst_prefix`` in trimmed ids, with the same sequences and documents, through the project's
    :class:`~megatron_phi4.data.indexed.IndexedDatasetWriter` (atomic: the pair appears complete or
    not at all). ``map_ids=False`` copies values unchanged (a ``_loss_mask`` companion). A token
    outside the map fails before anything is published, naming the dataset and the sequence.
    Returns the number of tokens written."""
    from megatron_phi4.data.indexed import IndexedDataset, IndexedDatasetWriter

    src = IndexedDataset(src_prefix)
    lens = np.asarray(src.sequence_lengths, dtype=np.int64)
    docs = np.asarray(src.document_indices, dtype=np.int64)
    dtype = np.int32 if map_ids else src.dtype
    with IndexedDatasetWriter(dst_prefix, dtype=dtype) as w:
        d = 0
        while d < len(docs) - 1:
            # a run of whole documents of about chunk_tokens tokens, mapped in one call
            first = d
            n_tok = 0
            while d < len(docs) - 1 and (d == first or n_tok < chunk_tokens):
                n_tok += int(lens[docs[d]:docs[d + 1]].sum())
                d += 1
            s0, s1 = int(docs[first]), int(docs[d])
            flat = np.concatenate(src[s0:s1]) if s1 > s0 else np.zeros(0, np.int64)
            if map_ids:
                try:
                    flat = vocab.trimmed_array(flat).astype(np.int32)
                except VocabMapError as e:
                    seq = s0 + int(np.searchsorted(np.cumsum(lens[s0:s1]), e.position, side="right"))
                    raise VocabMapError(f"{src_prefix}: sequence {seq}: {e}", e.position) from None
            seq_lens = lens[s0:s1]
            if all(docs[k + 1] - docs[k] == 1 for k in range(first, d)):
                w.add_documents(flat, seq_lens)
            else:
                off = 0
                for k in range(first, d):
                    dl = lens[docs[k]:docs[k + 1]]
                    w.add_document(flat[off:off + int(dl.sum())], lengths=dl)
                    off += int(dl.sum())
    return int(lens.sum())
