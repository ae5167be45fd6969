"""Resumable, data-parallel-aware sample order and micro-batch collation.

:class:`PretrainSampler` has megatron's ``MegatronPretrainingSampler`` semantics: the global
sample stream is ``consumed_samples, consumed_samples + 1, ...``; every step of
``micro_batch_size * dp_size`` consecutive global indices is split contiguously across DP ranks
(rank ``r`` gets ``[r * mbs, (r + 1) * mbs)`` of the step). A global batch (``global_batch_size``
consecutive indices, a multiple of ``mbs * dp``) therefore holds the same samples whatever the
DP size, and resuming at ``consumed_samples = k`` (a multiple of the global batch) continues the
exact stream an uninterrupted run would have read -- also when the DP size changes.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from megatron_phi4.tokenizer import EOD_ID, PAD_ID

__all__ = ["PretrainSampler", "step_indices", "make_collate", "collate_lm", "build_dataloader"]


class PretrainSampler:
    """Yields lists of ``micro_batch_size`` dataset indices for one DP rank.

    ``drop_last`` (default) stops at the last full step; otherwise the final partial step is
    split as evenly as possible (ranks may get fewer or no samples).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise ValueError(f"total_samples must be positive, got {total_samples}")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} outside [0, {total_samples}]")
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.drop_last = drop_last

    @property
    def step_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        left = self.total_samples - self.consumed_samples
        full = left // self.step_size
        if not self.drop_last and left % self.step_size:
            full += 1
        return full

    def _slice(self, n_in_step: int):
        if n_in_step == self.step_size:
            a = self.dp_rank * self.micro_batch_size
            return a, a + self.micro_batch_size
        per = -(-n_in_step // self.dp_size)
        a = min(self.dp_rank * per, n_in_step)
        return a, min(a + per, n_in_step)

    def __iter__(self) -> Iterator[List[int]]:
        step = self.step_size
        for s in range(self.consumed_samples, self.total_samples, step):
            n = min(step, self.total_samples - s)
            if n < step and self.drop_last:
                return
            a, b = self._slice(n)
            yield list(range(s + a, s + b))

    def state_dict(self) -> Dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "total_samples": self.total_samples}


def step_indices(consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int) -> List[List[int]]:
    """This DP rank's micro-batches (lists of global sample indices) of the optimizer step that
    starts at ``consumed_samples`` and takes ``global_batch_size`` samples: the
    :class:`PretrainSampler` rule over exactly that step. The global batch must split into whole
    micro-steps of ``micro_batch_size * dp_size`` (a ``ValueError`` otherwise: a silently smaller
    batch would change the run)."""
    per_step = int(micro_batch_size) * int(dp_size)
    if global_batch_size % per_step:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                         f"micro_batch_size * dp = {micro_batch_size} * {dp_size}")
    start = int(consumed_samples)
    return list(PretrainSampler(start + int(global_batch_size), start, micro_batch_size,
                                dp_rank, dp_size))


def _stack(items, key):
    import torch
    vals = [it[key] for it in items]
    return torch.stack([v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
                        for v in vals])


def collate_lm(samples: Sequence[dict], pad_id: int = PAD_ID, eod_id: int = EOD_ID,
               eod_mask_loss: bool = False, extra_mask=None) -> Dict:
    """Stack samples ``{"tokens": [S+1], optional "loss_mask": [S], "position_ids": [S],
    "document_ids": [S]}`` into a micro-batch:

    ``input_ids = tokens[:, :-1]``, ``labels = tokens[:, 1:]`` (int64 ``[B, S]``), ``loss_mask``
    (float32 ``[B, S]``: the samples' own mask (1 if absent), times 0 where the label is
    ``pad_id``, where the input is ``eod_id`` when ``eod_mask_loss``, and where ``extra_mask`` --
    an optional callable ``(input_ids, labels) -> bool tensor`` of positions to keep -- is False),
    ``position_ids`` and ``document_ids`` (int64 ``[B, S]``; arange / zeros when absent).
    """
    import torch
    tokens = _stack(samples, "tokens").long()
    input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    B, S = input_ids.shape
    if "loss_mask" in samples[0]:
        loss_mask = _stack(samples, "loss_mask").float()
    else:
        loss_mask = torch.ones(B, S, dtype=torch.float32)
    loss_mask = loss_mask * (labels != pad_id)
    if eod_mask_loss:
        loss_mask = loss_mask * (input_ids != eod_id)
    if extra_mask is not None:
        loss_mask = loss_mask * extra_mask(input_ids, labels).to(torch.float32)
    out = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask}
    out["position_ids"] = (_stack(samples, "position_ids").long() if "position_ids" in samples[0]
                           else torch.arange(S).expand(B, S).contiguous())
    out["document_ids"] = (_stack(samples, "document_ids").long() if "document_ids" in samples[0]
                           else torch.zeros(B, S, dtype=torch.long))
    if "dataset_id" in samples[0]:
        out["dataset_id"] = torch.tensor([int(s["dataset_id"]) for s in samples])
    return out


def make_collate(pad_id: int = PAD_ID, eod_id: int = EOD_ID, eod_mask_loss: bool = False,
                 extra_mask=None):
    """A picklable-enough collate function for ``torch.utils.data.DataLoader(collate_fn=...)``."""
    import functools
    return functools.partial(collate_lm, pad_id=pad_id, eod_id=eod_id,
                             eod_mask_loss=eod_mask_loss, extra_mask=extra_mask)


def build_dataloader(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                     dp_size: int, collate_fn=None, num_workers: int = 0,
                     total_samples: Optional[int] = None, **kwargs):
    """``torch.utils.data.DataLoader`` over ``dataset`` in :class:`PretrainSampler` order
    (``collate_fn`` defaults to :func:`collate_lm`). Works for the pre-training, SFT and
    preference datasets (pass :func:`~megatron_phi4.data.preference.collate_preference` there)."""
    from torch.utils.data import DataLoader
    sampler = PretrainSampler(total_samples if total_samples is not None else len(dataset),
                              consumed_samples, micro_batch_size, dp_rank, dp_size)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn or collate_lm, pin_memory=kwargs.pop("pin_memory", False),
                      persistent_workers=num_workers > 0, **kwargs)
