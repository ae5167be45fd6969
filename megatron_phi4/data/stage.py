"""Per-stage data for the trainer: global batches split over data-parallel ranks, resumable.

:func:`build_stage_data` turns a :class:`~megatron_phi4.config.StageConfig` into a
:class:`StageData` whose :meth:`StageData.next_global_batch` returns this DP rank's micro-batches
of the next optimizer step.

Sample order (the same for every kind): the stage reads the global sample stream ``0, 1, 2, ...``
of its source; step ``t`` takes the ``global_batch_size_at(consumed)`` consecutive indices
starting at ``consumed_samples`` (:mod:`~megatron_phi4.data.batch_schedule`), split over DP ranks
by :func:`~megatron_phi4.data.sampler.step_indices` -- the one copy of megatron's
``MegatronPretrainingSampler`` rule (:class:`~megatron_phi4.data.sampler.PretrainSampler`).
Hence a global batch holds the same samples whatever the DP size, and restarting with the same
``consumed_samples`` continues exactly the stream an uninterrupted run would have read -- also
with a different DP size. Every TP/PP rank of one replica calls with the same ``dp_rank`` and
gets identical micro-batches (all of them, within a step, of the same shape).

What an index holds is the source's business: ``data.kind`` names a builder in
:data:`megatron_phi4.registry.DATA_KINDS` (see :mod:`~megatron_phi4.data.sources`).

LM batches: ``input_ids, labels, loss_mask, position_ids, document_ids`` ``[mbs, seq_length]``;
preference batches: :func:`~megatron_phi4.data.preference.collate_preference`'s layout.

Index cache. The index arrays of a 10T-token stage are about 49 GB; built in memory by every
TP/PP/DP rank they exhaust a node. Pass ``cache_dir`` (the trainer passes ``data.cache_dir`` or
``<run_dir>/data_cache``): inside a process group the arrays are then built by one rank per job
(shared storage) or per node (node-local storage) while the others wait, and every rank
memory-maps them (:func:`~megatron_phi4.data.cache.build_collectively`). ``cache_dir=None`` with
``data.cache_dir`` unset builds in memory, per process (for library use and small data).
"""
from __future__ import annotations

from typing import Dict, List, Optional

from megatron_phi4.data.batch_schedule import global_batch_size_at, num_samples_for, steps_for
from megatron_phi4.data.cache import build_collectively, collective_available
from megatron_phi4.data.sampler import step_indices
from megatron_phi4.data.sources import SourceRequest, StageSource
from megatron_phi4.tokenizer import EOD_ID, PAD_ID, PHI4_VOCAB_SIZE

__all__ = ["StageData", "build_stage_data", "build_validation_data", "num_samples_for",
           "global_batch_size_at"]


def _microbatches(source: StageSource, start: int, gbs: int, mbs: int, dp_rank: int,
                  dp_size: int) -> List[Dict]:
    return [source.collate([source.get(i) for i in idx])
            for idx in step_indices(start, gbs, mbs, dp_rank, dp_size)]


class StageData:
    """This DP rank's view of a stage's sample stream; see the module docstring.

    ``consumed_samples`` is global (all DP ranks) and stage-local (0 at the stage start); it is
    the only state (``state_dict()``/``load_state_dict()``).
    """

    def __init__(self, source: StageSource, data_cfg, dp_rank: int, dp_size: int,
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
        return steps_for(self.data_cfg, self.consumed_samples)

    def has_next(self) -> bool:
        return self.consumed_samples + self.global_batch_size_at() <= self.num_samples

    def peek_global_batch(self) -> List[Dict]:
        """The micro-batches :meth:`next_global_batch` would return, without advancing."""
        gbs = self.global_batch_size_at()
        if self.consumed_samples + gbs > self.num_samples:
            raise StopIteration(f"stage data exhausted: {self.consumed_samples} of "
                                f"{self.num_samples} samples consumed, next batch needs {gbs}")
        return _microbatches(self.source, self.consumed_samples, gbs, self.micro_batch_size,
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


def _build_source(stage_cfg, num_samples: int, *, validation: bool, pad_id: int, eod_id: int,
                  cache_dir: Optional[str], vocab_size: int,
                  collective: Optional[bool]) -> StageSource:
    from megatron_phi4.registry import DATA_KINDS
    data_cfg = getattr(stage_cfg, "data", stage_cfg)
    loss = getattr(stage_cfg, "loss", None)
    loss_type = getattr(loss, "type", "lm")
    cache_dir = cache_dir if cache_dir is not None else data_cfg.cache_dir
    builder = DATA_KINDS.get(data_cfg.kind)
    req = SourceRequest(data=data_cfg, loss_type=loss_type, num_samples=int(num_samples),
                        validation=validation, pad_id=pad_id, eod_id=eod_id,
                        cache_dir=None if cache_dir is None else str(cache_dir),
                        vocab_size=int(vocab_size),
                        ref_logps=getattr(loss, "dpo_reference", "model") == "precomputed")
    if collective is None:
        collective = cache_dir is not None and collective_available()
    if collective:
        return build_collectively(lambda: builder(req))
    return builder(req)


def _token_ids(data_cfg, pad_id: Optional[int], eod_id: Optional[int]):
    """Explicit arguments, else the data config's ``pad_id``/``eod_id``, else Phi-4's. A model on a
    renumbered vocabulary (the CPU demo's trimmed one) sets them in its data config, and the
    trainer, which passes none, then pads and splits documents with the data's own ids."""
    pad = pad_id if pad_id is not None else getattr(data_cfg, "pad_id", None)
    eod = eod_id if eod_id is not None else getattr(data_cfg, "eod_id", None)
    return (PAD_ID if pad is None else int(pad)), (EOD_ID if eod is None else int(eod))


def build_stage_data(stage_cfg, dp_rank: int, dp_size: int, consumed_samples: int, num_steps: int,
                     *, pad_id: Optional[int] = None, eod_id: Optional[int] = None,
                     cache_dir: Optional[str] = None, vocab_size: int = PHI4_VOCAB_SIZE,
                     collective: Optional[bool] = None) -> StageData:
    """:class:`StageData` for ``stage_cfg`` (a StageConfig, or a DataConfig for LM losses) with
    ``num_samples = num_samples_for(data, num_steps)`` samples.

    ``vocab_size`` bounds synthetic tokens (pass the model's). ``pad_id``/``eod_id``: None takes
    ``data.pad_id``/``data.eod_id``, else Phi-4's.

    ``cache_dir``: where the index arrays are cached and memory-mapped from. The caller decides
    (the trainer passes ``data.cache_dir``, else ``<run_dir>/data_cache``); ``None`` falls back to
    ``data.cache_dir``, and with that unset too the arrays are built in this process's memory
    (fine for small data; at 10T tokens that is ~49 GB per rank -- pass a directory).

    ``collective``: build the arrays once per job / node and let the other ranks wait and map
    them (:func:`~megatron_phi4.data.cache.build_collectively`). ``None`` (default): when there is a
    cache directory and a process group of more than one rank -- then EVERY rank of the default
    group must call this function, at the same point. ``False`` for a call on a subset of ranks
    (the file lock alone then serializes builders).
    """
    data_cfg = getattr(stage_cfg, "data", stage_cfg)
    pad_id, eod_id = _token_ids(data_cfg, pad_id, eod_id)
    n = num_samples_for(data_cfg, num_steps)
    src = _build_source(stage_cfg, n, validation=False, pad_id=pad_id, eod_id=eod_id,
                        cache_dir=cache_dir, vocab_size=vocab_size, collective=collective)
    return StageData(src, data_cfg, dp_rank, dp_size, consumed_samples, num_steps, n)


def build_validation_data(stage_cfg, dp_rank: int, dp_size: int, *,
                          eval_iters: Optional[int] = None, pad_id: Optional[int] = None,
                          eod_id: Optional[int] = None, cache_dir: Optional[str] = None,
                          vocab_size: int = PHI4_VOCAB_SIZE,
                          collective: Optional[bool] = None) -> Optional[List[List[Dict]]]:
    """Held-out micro-batches: ``eval_iters`` (default ``stage_cfg.eval_iters``) global batches of
    ``global_batch_size`` samples from ``data.validation`` (a mixture YAML for pretrain; prefixes /
    files, comma-separated or a list, for sft / preference), this DP rank's share of each, as a
    list (one entry per global batch) of lists of micro-batches. Deterministic (fixed seed; the
    same set at every evaluation). ``None`` when ``data.validation`` is unset (synthetic: any
    value enables a held-out random stream). ``cache_dir`` and ``collective`` as in
    :func:`build_stage_data` (when ``data.validation`` is set the call is a collective too)."""
    data_cfg = getattr(stage_cfg, "data", stage_cfg)
    if not data_cfg.validation:
        return None
    pad_id, eod_id = _token_ids(data_cfg, pad_id, eod_id)
    iters = int(eval_iters if eval_iters is not None else getattr(stage_cfg, "eval_iters", 1))
    gbs = int(data_cfg.global_batch_size)
    src = _build_source(stage_cfg, iters * gbs, validation=True, pad_id=pad_id, eod_id=eod_id,
                        cache_dir=cache_dir, vocab_size=vocab_size, collective=collective)
    mbs = int(data_cfg.micro_batch_size)
    return [_microbatches(src, k * gbs, gbs, mbs, dp_rank, dp_size) for k in range(iters)]
