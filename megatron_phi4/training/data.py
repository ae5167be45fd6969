"""Per-stage data for the trainer: global batches split over data-parallel ranks, resumable.

:func:`build_stage_data` turns a :class:`~megatron_phi4.config.StageConfig` into a
:class:`StageData` whose :meth:`StageData.next_global_batch` returns this DP rank's micro-batches
of the next optimizer step.

Sample order (the same for every kind): the stage reads the global sample stream ``0, 1, 2, ...``
of its dataset; step ``t`` takes the ``global_batch_size_at(consumed)`` consecutive indices starting
at ``consumed_samples``. Within a step, micro-step ``j`` takes ``micro_batch_size * dp_size``
consecutive indices and DP rank ``r`` gets the ``r``-th contiguous slice of ``micro_batch_size``
(megatron's ``MegatronPretrainingSampler`` rule, as :class:`~megatron_phi4.data.PretrainSampler`).
Hence a global batch holds the same samples whatever the DP size, and restarting with the same
``consumed_samples`` continues exactly the stream an uninterrupted run would have read -- also
with a different DP size. Every TP/PP rank of one replica calls with the same ``dp_rank`` and gets
identical micro-batches (all of them, within a step, of the same shape).

Kinds:

* ``pretrain``: a blend of packed :class:`~megatron_phi4.data.GPTDataset` s over the mixture spec
  (:func:`~megatron_phi4.data.build_pretrain_dataset`); :meth:`StageData.tokens_per_source` comes
  from the closed-form blend counts of ``consumed_samples``;
* ``sft``: packed conversations (:class:`~megatron_phi4.data.SFTDataset`);
* ``preference``: pairs (:class:`~megatron_phi4.data.PreferenceDataset`) visited in a seeded
  shuffled order per epoch, collated by :func:`~megatron_phi4.data.collate_preference` as
  ``[chosen; rejected]`` rows (one micro-batch = ``micro_batch_size`` pairs) padded to exactly
  ``seq_length`` columns;
* ``synthetic``: random tokens seeded by ``(seed, sample index)`` (LM batches, or preference
  batches when the stage's loss is DPO).

LM batches: ``input_ids, labels, loss_mask, position_ids, document_ids`` ``[mbs, seq_length]``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np

__all__ = ["StageData", "build_stage_data", "build_validation_data", "num_samples_for",
           "global_batch_size_at", "PAD_ID", "EOD_ID"]

PAD_ID = 100349
EOD_ID = 100257
_LM_KEYS = ("input_ids", "labels", "loss_mask", "position_ids", "document_ids")
_VALID_SALT = 0x5A11D  # validation streams use a different seed than training streams


def _rng(*seeds: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [int(s) & (2**63 - 1) for s in seeds])))


# --------------------------------------------------------------------------- batch-size ramp
def global_batch_size_at(data_cfg, consumed_samples: int) -> int:
    """Global batch size for the step starting at ``consumed_samples`` (megatron's
    ``--rampup-batch-size start increment ramp_samples``: the batch grows from ``start`` by
    ``increment`` every ``ramp_samples / num_increments`` samples until ``global_batch_size``)."""
    gbs = int(data_cfg.global_batch_size)
    ramp = data_cfg.batch_size_ramp
    if not ramp:
        return gbs
    start, inc, ramp_samples = (int(x) for x in ramp)
    if start <= 0 or inc <= 0 or ramp_samples < 0:
        raise ValueError(f"batch_size_ramp {ramp}: start and increment must be positive")
    if start >= gbs:
        return gbs
    if (gbs - start) % inc:
        raise ValueError(f"batch_size_ramp {ramp}: global_batch_size {gbs} - start {start} is not "
                         f"a multiple of the increment {inc}")
    if consumed_samples >= ramp_samples:
        return gbs
    n_inc = (gbs - start) // inc
    per_inc = ramp_samples / n_inc
    return min(gbs, start + int(consumed_samples // per_inc) * inc)


def num_samples_for(data_cfg, num_steps: int) -> int:
    """Samples consumed by ``num_steps`` optimizer steps (exact, also with a ramp)."""
    if not data_cfg.batch_size_ramp:
        return int(num_steps) * int(data_cfg.global_batch_size)
    c = 0
    for _ in range(int(num_steps)):
        c += global_batch_size_at(data_cfg, c)
    return c


# --------------------------------------------------------------------------- sample sources
class _Source:
    """A deterministic map: global sample index -> sample dict, plus its collate function."""

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
        return {k: out[k] for k in _LM_KEYS}


class _PretrainSource(_Source):
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


class _SFTSource(_Source):
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


class _SyntheticSource(_Source):
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
        self.collate = (_PreferenceCollate(pad_id, self.seq_length) if preference
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


class _PreferenceCollate:
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


class _PreferenceSource(_Source):
    """Pairs in a seeded order: epoch ``e`` is a permutation of all pairs from ``(seed, e)``."""

    kind = "preference"

    def __init__(self, paths, seq_length, num_samples, seed, pad_id, vocab_size=100352) -> None:
        from megatron_phi4.data.preference import PreferenceDataset
        self.ds = PreferenceDataset(paths, vocab_size=max(int(vocab_size), 100352))
        n = len(self.ds)
        if n == 0:
            raise ValueError(f"preference data {paths}: no pairs")
        self.size = int(num_samples)
        self.seq_length = int(seq_length)
        epochs = max(1, -(-self.size // n))
        self.order = np.concatenate([_rng(seed, 0xD90, e).permutation(n) for e in range(epochs)])
        self.collate = _PreferenceCollate(pad_id, self.seq_length)
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


def _as_list(paths) -> List[str]:
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        return [p for p in str(paths).split(",") if p]
    return [str(p) for p in paths]


def _make_source(data_cfg, loss_type: str, num_samples: int, *, pad_id: int, eod_id: int,
                 cache_dir: Optional[str], vocab_size: int, validation: bool = False) -> _Source:
    kind = data_cfg.kind
    seed = int(data_cfg.seed) + (_VALID_SALT if validation else 0)
    S = int(data_cfg.seq_length)
    if kind == "pretrain":
        mix = data_cfg.validation if validation else data_cfg.mixture
        return _PretrainSource(mix, S, num_samples, seed, cache_dir, pad_id, eod_id,
                               int(data_cfg.min_document_tokens))
    if kind == "sft":
        paths = _as_list(data_cfg.validation) if validation else _as_list(data_cfg.paths)
        return _SFTSource(paths, S, num_samples, seed, cache_dir, pad_id, eod_id)
    if kind == "preference":
        paths = _as_list(data_cfg.validation) if validation else _as_list(data_cfg.paths)
        return _PreferenceSource(paths, S, num_samples, seed, pad_id, vocab_size)
    if kind == "synthetic":
        return _SyntheticSource(S, num_samples, data_cfg.seed, vocab_size, pad_id, eod_id,
                                preference=(loss_type == "dpo"), salt=1 if validation else 0)
    raise ValueError(f"data.kind: unknown kind {kind!r}")


def _rank_microbatches(source: _Source, start: int, gbs: int, mbs: int, dp_rank: int,
                       dp_size: int) -> List[Dict]:
    step = mbs * dp_size
    if gbs % step:
        raise ValueError(f"global batch size {gbs} is not divisible by micro_batch_size * dp = "
                         f"{mbs} * {dp_size}")
    out = []
    for j in range(gbs // step):
        a = start + j * step + dp_rank * mbs
        out.append(source.collate([source.get(i) for i in range(a, a + mbs)]))
    return out


# --------------------------------------------------------------------------- stage data
class StageData:
    """This DP rank's view of a stage's sample stream; see the module docstring.

    ``consumed_samples`` is global (all DP ranks) and stage-local (0 at the stage start); it is
    the only state (``state_dict()``/``load_state_dict()``).
    """

    def __init__(self, source: _Source, data_cfg, dp_rank: int, dp_size: int,
                 consumed_samples: int, num_steps: int, num_samples: int) -> None:
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        self.source = source
        self.data_cfg = data_cfg
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.micro_batch_size = int(data_cfg.micro_batch_size)
        self.seq_length = int(data_cfg.seq_length)
        self.kind = source.kind  # "lm" or "preference" (batch layout)
        self.num_steps = int(num_steps)
        self.num_samples = int(num_samples)
        if not 0 <= consumed_samples <= self.num_samples:
            raise ValueError(f"consumed_samples {consumed_samples} outside [0, {self.num_samples}]")
        self.consumed_samples = int(consumed_samples)

    # batch sizes
    def global_batch_size_at(self, consumed_samples: Optional[int] = None) -> int:
        c = self.consumed_samples if consumed_samples is None else int(consumed_samples)
        return global_batch_size_at(self.data_cfg, c)

    def num_microbatches_at(self, consumed_samples: Optional[int] = None) -> int:
        return self.global_batch_size_at(consumed_samples) // (self.micro_batch_size * self.dp_size)

    @property
    def step(self) -> int:
        """Optimizer steps done so far (derived from consumed_samples)."""
        if not self.data_cfg.batch_size_ramp:
            return self.consumed_samples // int(self.data_cfg.global_batch_size)
        c = t = 0
        while c < self.consumed_samples:
            c += global_batch_size_at(self.data_cfg, c)
            t += 1
        return t

    def has_next(self) -> bool:
        return self.consumed_samples + self.global_batch_size_at() <= self.num_samples

    def peek_global_batch(self) -> List[Dict]:
        """The micro-batches :meth:`next_global_batch` would return, without advancing."""
        gbs = self.global_batch_size_at()
        if self.consumed_samples + gbs > self.num_samples:
            raise StopIteration(f"stage data exhausted: {self.consumed_samples} of "
                                f"{self.num_samples} samples consumed, next batch needs {gbs}")
        return _rank_microbatches(self.source, self.consumed_samples, gbs, self.micro_batch_size,
                                  self.dp_rank, self.dp_size)

    def next_global_batch(self) -> List[Dict]:
        """This rank's micro-batches of the next optimizer step; advances ``consumed_samples`` by
        the global batch size."""
        out = self.peek_global_batch()
        self.consumed_samples += len(out) * self.micro_batch_size * self.dp_size
        return out

    def __iter__(self):
        while self.has_next():
            yield self.next_global_batch()

    # accounting
    def consumed_tokens(self) -> int:
        return int(sum(self.tokens_per_source().values()))

    def tokens_per_source(self) -> Dict[str, int]:
        """Tokens consumed GLOBALLY so far per source, from ``consumed_samples`` alone
        (pretrain: ``seq_length`` x blend counts per source; sft/synthetic: one entry;
        preference: prompt+chosen + prompt+rejected tokens per pair, by the pairs' ``source``)."""
        return self.source.tokens_per_source(self.consumed_samples)

    def state_dict(self) -> Dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        c = int(state["consumed_samples"])
        if not 0 <= c <= self.num_samples:
            raise ValueError(f"consumed_samples {c} outside [0, {self.num_samples}]")
        self.consumed_samples = c


def build_stage_data(stage_cfg, dp_rank: int, dp_size: int, consumed_samples: int, num_steps: int,
                     *, pad_id: int = PAD_ID, eod_id: int = EOD_ID,
                     cache_dir: Optional[str] = None, vocab_size: int = 100352) -> StageData:
    """:class:`StageData` for ``stage_cfg`` (a StageConfig, or a DataConfig for LM losses) with
    ``num_samples = num_samples_for(data, num_steps)`` samples. ``vocab_size`` bounds synthetic
    tokens (pass the model's)."""
    data_cfg = getattr(stage_cfg, "data", stage_cfg)
    loss_type = getattr(getattr(stage_cfg, "loss", None), "type", "lm")
    cache_dir = cache_dir if cache_dir is not None else data_cfg.cache_dir
    n = num_samples_for(data_cfg, num_steps)
    src = _make_source(data_cfg, loss_type, n, pad_id=pad_id, eod_id=eod_id, cache_dir=cache_dir,
                       vocab_size=vocab_size)
    return StageData(src, data_cfg, dp_rank, dp_size, consumed_samples, num_steps, n)


def build_validation_data(stage_cfg, dp_rank: int, dp_size: int, *,
                          eval_iters: Optional[int] = None, pad_id: int = PAD_ID,
                          eod_id: int = EOD_ID, cache_dir: Optional[str] = None,
                          vocab_size: int = 100352) -> Optional[List[List[Dict]]]:
    """Held-out micro-batches: ``eval_iters`` (default ``stage_cfg.eval_iters``) global batches of
    ``global_batch_size`` samples from ``data.validation`` (a mixture YAML for pretrain; prefixes /
    files, comma-separated or a list, for sft / preference), this DP rank's share of each, as a
    list (one entry per global batch) of lists of micro-batches. Deterministic (fixed seed; the
    same set at every evaluation). ``None`` when ``data.validation`` is unset (synthetic: any
    value enables a held-out random stream)."""
    data_cfg = getattr(stage_cfg, "data", stage_cfg)
    if not data_cfg.validation:
        return None
    loss_type = getattr(getattr(stage_cfg, "loss", None), "type", "lm")
    iters = int(eval_iters if eval_iters is not None else getattr(stage_cfg, "eval_iters", 1))
    gbs = int(data_cfg.global_batch_size)
    cache_dir = cache_dir if cache_dir is not None else data_cfg.cache_dir
    src = _make_source(data_cfg, loss_type, iters * gbs, pad_id=pad_id, eod_id=eod_id,
                       cache_dir=cache_dir, vocab_size=vocab_size, validation=True)
    mbs = int(data_cfg.micro_batch_size)
    return [_rank_microbatches(src, k * gbs, gbs, mbs, dp_rank, dp_size) for k in range(iters)]
