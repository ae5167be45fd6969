"""Sample sources of stage data, one per ``data.kind``, built through the ``DATA_KINDS`` registry.

A *source* is a deterministic map ``global sample index -> sample`` plus the collate function
that turns a list of its samples into one micro-batch, and the per-source token accounting of a
sample-stream prefix. :mod:`megatron_phi4.data.stage` decides *which* indices a rank reads (the
sampler rule); a source only says what an index holds. Keeping the two apart is what lets every
kind share the one resumable, DP-size-invariant order.

Each kind is a builder ``fn(request: SourceRequest) -> StageSource`` registered under its name in
:data:`megatron_phi4.registry.DATA_KINDS`; a new kind plugs in with one line::

    from megatron_phi4.registry import DATA_KINDS
    DATA_KINDS.register("my_kind", "my_package.data:build_my_source")

Kinds here:

* ``pretrain``: a blend of packed :class:`~megatron_phi4.data.gpt_dataset.GPTDataset` s over the
  mixture spec; tokens per source from the closed-form blend counts;
* ``sft``: packed conversations (:class:`~megatron_phi4.data.sft_dataset.SFTDataset`);
* ``preference``: pairs (:class:`~megatron_phi4.data.preference.PreferenceDataset`) visited in a
  seeded shuffled order per epoch, collated as ``[chosen; rejected]`` rows padded to exactly
  ``seq_length`` columns;
* ``synthetic``: random tokens seeded by ``(seed, sample index)`` (LM samples, or preference
  pairs when the stage's loss is DPO).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np

from megatron_phi4.tokenizer import PHI4_VOCAB_SIZE

__all__ = ["SourceRequest", "StageSource", "build_pretrain_source", "build_sft_source",
           "build_preference_source", "build_synthetic_source", "LM_KEYS"]

LM_KEYS = ("input_ids", "labels", "loss_mask", "position_ids", "document_ids")
_VALID_SALT = 0x5A11D  # validation streams use a different seed than training streams


def _rng(*seeds: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [int(s) & (2**63 - 1) for s in seeds])))


def _as_list(paths) -> List[str]:
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        return [p for p in str(paths).split(",") if p]
    return [str(p) for p in paths]


@dataclass(frozen=True)
class SourceRequest:
    """Everything a source builder may need.

    ``data``: the stage's DataConfig; ``loss_type``: the stage's loss (``dpo`` makes synthetic data
    preference pairs); ``num_samples``: samples the stream must hold; ``validation``: build the
    held-out stream (``data.validation``) instead of the training one; ``cache_dir``: where index
    arrays are cached (None: built in memory); ``vocab_size``: the model's (bounds synthetic ids).
    """

    data: Any
    loss_type: str
    num_samples: int
    validation: bool
    pad_id: int
    eod_id: int
    cache_dir: Optional[str]
    vocab_size: int
    ref_logps: bool = False  # preference: read precomputed reference log-probs from sidecars

    @property
    def seed(self) -> int:
        return int(self.data.seed) + (_VALID_SALT if self.validation else 0)

    @property
    def seq_length(self) -> int:
        return int(self.data.seq_length)

    def paths(self) -> List[str]:
        """The prefixes / files this request reads (sft, preference): ``data.validation`` (comma
        separated or a list) for a validation request, else ``data.paths``."""
        return _as_list(self.data.validation if self.validation else self.data.paths)


class StageSource:
    """A deterministic map: global sample index -> sample dict, plus its collate function.

    ``kind`` is the batch layout (``"lm"`` or ``"preference"``); ``size`` the number of samples.
    """

    kind = "lm"
    size: int

    def get(self, i: int) -> dict:
        raise NotImplementedError

    def collate(self, samples: List[dict]) -> Dict:
        raise NotImplementedError

    def tokens_per_source(self, consumed: int) -> Dict[str, int]:
        raise NotImplementedError


class _LMCollate:
    def __init__(self, pad_id: int, eod_id: int) -> None:
        self.pad_id, self.eod_id = pad_id, eod_id

    def __call__(self, samples: List[dict]) -> Dict:
        from megatron_phi4.data.sampler import collate_lm
        out = collate_lm(samples, pad_id=self.pad_id, eod_id=self.eod_id)
        return {k: out[k] for k in LM_KEYS}


class PreferenceCollate:
    """Preference micro-batches of exactly ``seq_length`` columns (the pipeline needs one shape)."""

    def __init__(self, pad_id: int, seq_length: int) -> None:
        self.pad_id, self.seq_length = pad_id, seq_length

    def __call__(self, pairs: List[dict]) -> Dict:
        import torch
        from megatron_phi4.data.preference import collate_preference
        out = collate_preference(pairs, pad_id=self.pad_id, max_length=self.seq_length,
                                 pad_to_multiple_of=self.seq_length)
        assert out["input_ids"].shape[1] == self.seq_length, out["input_ids"].shape
        out["document_ids"] = torch.zeros_like(out["input_ids"])
        return out


class PretrainSource(StageSource):
    def __init__(self, mixture, seq_length, num_samples, seed, cache_dir, pad_id, eod_id,
                 min_document_tokens) -> None:
        from megatron_phi4.data.gpt_dataset import build_pretrain_dataset
        self.ds = build_pretrain_dataset(mixture, seq_length, max(int(num_samples), 1), seed=seed,
                                         cache_dir=cache_dir, eod_id=eod_id,
                                         min_document_tokens=min_document_tokens)
        self.size = len(self.ds)
        self.seq_length = int(seq_length)
        self.source_names = list(self.ds.spec.names)
        self.collate = _LMCollate(pad_id, eod_id)

    def get(self, i: int) -> dict:
        return self.ds[i]

    def tokens_per_source(self, consumed: int) -> Dict[str, int]:
        from megatron_phi4.data.blending import blend_counts
        counts = blend_counts(self.ds.weights, min(int(consumed), self.size))
        out = {n: 0 for n in self.source_names}
        for d, c in enumerate(counts):
            out[self.source_names[self.ds.source_of[d]]] += int(c) * self.seq_length
        return out


class SFTSource(StageSource):
    def __init__(self, prefixes, seq_length, num_samples, seed, cache_dir, pad_id, eod_id) -> None:
        from megatron_phi4.data.sft_dataset import SFTDataset
        self.ds = SFTDataset(prefixes, seq_length, seed=seed, num_samples=max(int(num_samples), 1),
                             pad_id=pad_id, cache_dir=cache_dir)
        self.size = len(self.ds)
        self.seq_length = int(seq_length)
        self.collate = _LMCollate(pad_id, eod_id)

    def get(self, i: int) -> dict:
        return self.ds[i]

    def tokens_per_source(self, consumed: int) -> Dict[str, int]:
        return {"sft": int(consumed) * self.seq_length}


class SyntheticSource(StageSource):
    """Random tokens in ``[0, vocab_size)`` seeded by ``(seed, salt, index)``; with ``preference``
    the pairs have a random prompt and two random completions."""

    def __init__(self, seq_length, num_samples, seed, vocab_size, pad_id, eod_id,
                 preference: bool = False, salt: int = 0) -> None:
        self.seq_length = int(seq_length)
        self.size = int(num_samples)
        self.seed, self.salt = int(seed), int(salt)
        self.vocab_size = int(vocab_size)
        self.preference = preference
        self.kind = "preference" if preference else "lm"
        self.pad_id = pad_id
        self.collate = (PreferenceCollate(pad_id, self.seq_length) if preference
                        else _LMCollate(pad_id, eod_id))

    def get(self, i: int) -> dict:
        import torch
        rng = _rng(self.seed, 0x5E7, self.salt, i)
        S, V = self.seq_length, self.vocab_size
        if not self.preference:
            return {"tokens": torch.from_numpy(rng.integers(0, V, S + 1, dtype=np.int64))}
        p = max(1, S // 2)
        c = max(1, S + 1 - p)
        return {"prompt_ids": torch.from_numpy(rng.integers(0, V, p, dtype=np.int64)),
                "chosen_ids": torch.from_numpy(rng.integers(0, V, c, dtype=np.int64)),
                "rejected_ids": torch.from_numpy(rng.integers(0, V, c, dtype=np.int64)),
                "weight": torch.tensor(1.0)}

    def tokens_per_source(self, consumed: int) -> Dict[str, int]:
        per = 2 * (self.seq_length + 1) if self.preference else self.seq_length
        return {"synthetic": int(consumed) * per}


class PreferenceSource(StageSource):
    """Pairs in a seeded order: epoch ``e`` is a permutation of all pairs from ``(seed, e)``."""

    kind = "preference"

    def __init__(self, paths, seq_length, num_samples, seed, pad_id,
                 vocab_size=PHI4_VOCAB_SIZE, ref_logps: bool = False) -> None:
        from megatron_phi4.data.preference import PreferenceDataset
        self.ds = PreferenceDataset(paths, vocab_size=max(int(vocab_size), PHI4_VOCAB_SIZE), ref_logps=ref_logps)
        n = len(self.ds)
        if n == 0:
            raise ValueError(f"preference data {paths}: no pairs")
        self.size = int(num_samples)
        self.seq_length = int(seq_length)
        epochs = max(1, -(-self.size // n))
        self.order = np.concatenate([_rng(seed, 0xD90, e).permutation(n) for e in range(epochs)])
        self.collate = PreferenceCollate(pad_id, self.seq_length)
        # tokens of each pair (both rows) and its source tag, for tokens_per_source
        toks = np.empty(n, np.int64)
        tags = []
        for i in range(n):
            r = self.ds.record(i)
            lp, lc, lr = len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])
            toks[i] = 2 * lp + lc + lr
            tags.append(r.get("source") or "preference")
        self.tag_names = sorted(set(tags))
        self.pair_tag = np.array([self.tag_names.index(t) for t in tags], np.int64)
        self.pair_tokens = toks

    def get(self, i: int) -> dict:
        return self.ds[int(self.order[i])]

    def tokens_per_source(self, consumed: int) -> Dict[str, int]:
        ids = self.order[:min(int(consumed), len(self.order))]
        sums = np.bincount(self.pair_tag[ids], weights=self.pair_tokens[ids],
                           minlength=len(self.tag_names))
        return {n: int(round(s)) for n, s in zip(self.tag_names, sums)}


# --------------------------------------------------------------------------- registered builders
def build_pretrain_source(req: SourceRequest) -> StageSource:
    d = req.data
    mixture = d.validation if req.validation else d.mixture
    return PretrainSource(mixture, req.seq_length, req.num_samples, req.seed, req.cache_dir,
                          req.pad_id, req.eod_id, int(d.min_document_tokens))


def build_sft_source(req: SourceRequest) -> StageSource:
    return SFTSource(req.paths(), req.seq_length, req.num_samples, req.seed, req.cache_dir,
                     req.pad_id, req.eod_id)


def build_preference_source(req: SourceRequest) -> StageSource:
    return PreferenceSource(req.paths(), req.seq_length, req.num_samples, req.seed, req.pad_id,
                            req.vocab_size, ref_logps=req.ref_logps)


def build_synthetic_source(req: SourceRequest) -> StageSource:
    # seeded by data.seed itself; the held-out stream differs by its salt
    return SyntheticSource(req.seq_length, req.num_samples, req.data.seed, req.vocab_size,
                           req.pad_id, req.eod_id, preference=(req.loss_type == "dpo"),
                           salt=1 if req.validation else 0)
