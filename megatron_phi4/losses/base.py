"""What every loss shares: the output contract and per-token log-probabilities.

Every loss returns a *sum* and the number of units it was summed over, never a mean: the engine
divides by the units of the whole global batch, so the loss of a step is the same whatever the
split into micro-batches, data-parallel ranks and pipeline stages.

What a loss reads from the last pipeline stage is declared by its ``inputs`` attribute:

* ``"label_log_probs"`` (LM, DPO: everything they need is log p(label) per token): the engine passes
  the labels to the model, whose head computes those log-probs a chunk of tokens at a time
  (``model.logits_chunk_tokens``) and never holds the whole logits; the loss receives them wrapped
  in :class:`LabelLogProbs`.
* ``"logits"`` (the default for a loss without the attribute): the full logits, or under tensor
  parallelism this rank's vocabulary shard (pass ``tp_group``; the sharded path never gathers the
  100352-wide logits).

:func:`token_log_probs` accepts either, so a loss written against it works with both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

IGNORE_INDEX = -100
INPUTS = ("logits", "label_log_probs")


@dataclass(frozen=True)
class LabelLogProbs:
    """log p(labels) per token, fp32 (batch, seq), computed by the model's head for the batch's
    ``labels`` (the engine guarantees they are the batch's); ignored labels (< 0) hold 0."""

    values: torch.Tensor


def loss_inputs(loss_fn) -> str:
    """What ``loss_fn`` reads from the last stage: ``loss_fn.inputs`` ("logits" if absent)."""
    inputs = getattr(loss_fn, "inputs", "logits")
    if inputs not in INPUTS:
        raise ValueError(f"{type(loss_fn).__name__}.inputs: got {inputs!r}, allowed: {', '.join(map(repr, INPUTS))}")
    return inputs


def token_log_probs(logits, targets: torch.Tensor, tp_group=None) -> torch.Tensor:
    """log p(targets[b, s] | prefix) in fp32, shape (batch, seq). Targets < 0 give 0.

    ``logits``: logits (full, or this rank's vocabulary shard with ``tp_group``), or the
    :class:`LabelLogProbs` the head already computed for these targets (returned as they are)."""
    if isinstance(logits, LabelLogProbs):
        if logits.values.shape != targets.shape:
            raise ValueError(f"label log-probs of shape {tuple(logits.values.shape)} for labels of shape "
                             f"{tuple(targets.shape)}")
        return logits.values
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
    """A loss is a pluggable piece of a stage: it maps the last stage's output (what ``inputs``
    names, see the module docstring) and the batch to a LossOutput."""

    inputs: str  # "logits" or "label_log_probs"

    def __call__(self, logits, batch: dict[str, torch.Tensor], tp_group=None) -> LossOutput: ...

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Units this micro-batch contributes, known before the forward pass, so the trainer can
        all-reduce the global count first and scale every micro-batch's loss by 1/global units."""
        ...
