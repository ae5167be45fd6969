"""What every loss shares: the output contract and per-token log-probabilities.

Every loss returns a *sum* and the number of units it was summed over, never a mean: the engine
divides by the units of the whole global batch, so the loss of a step is the same whatever the
split into micro-batches, data-parallel ranks and pipeline stages.

``logits`` may be the full vocabulary or, under tensor parallelism, this rank's vocabulary shard
(pass ``tp_group``); the sharded path never gathers the 100352-wide logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

IGNORE_INDEX = -100


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor, tp_group=None) -> torch.Tensor:
    """log p(targets[b, s] | prefix) in fp32, shape (batch, seq). Targets < 0 give 0."""
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        from megatron_phi4.distributed.vocab_parallel import vocab_parallel_log_probs

        return vocab_parallel_log_probs(logits, targets, tp_group)
    safe = targets.clamp(min=0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(targets < 0, 0.0)


def sequence_log_probs(logits, labels, loss_mask, tp_group=None) -> torch.Tensor:
    """Sum of log-probs over each row's completion tokens, shape (batch,)."""
    return (token_log_probs(logits, labels, tp_group) * loss_mask.float()).sum(-1)


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # differentiable; summed over `units`
    units: torch.Tensor  # tokens (LM) or pairs (DPO) this micro-batch contributes
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # sums over units, for logging


class LossFn(Protocol):
    """A loss is a pluggable piece of a stage: it maps the last stage's logits and the batch to a LossOutput."""

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], tp_group=None) -> LossOutput: ...

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Units this micro-batch contributes, known before the forward pass, so the trainer can
        all-reduce the global count first and scale every micro-batch's loss by 1/global units."""
        ...
