"""Losses the trainer asks the last pipeline stage to compute.

Every loss returns a *sum* and the number of units it was summed over, never a mean: the trainer
divides by the units of the whole global batch, so the loss of a step is the same whatever the
split into micro-batches, data-parallel ranks and pipeline stages.

``logits`` may be the full vocabulary or, under tensor parallelism, this rank's vocabulary shard
(pass ``tp_group``); the sharded path never gathers the 100352-wide logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor, tp_group=None) -> torch.Tensor:
    """log p(targets[b, s] | prefix) in fp32, shape (batch, seq). Targets < 0 give 0."""
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        from megatron_phi4.distributed.vocab_parallel import vocab_parallel_log_probs

        return vocab_parallel_log_probs(logits, targets, tp_group)
    safe = targets.clamp(min=0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(targets < 0, 0.0)


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


class LMLoss:
    """Next-token cross entropy over tokens where ``loss_mask`` is 1 (SFT trains only on assistant turns)."""

    def __call__(self, logits, batch, tp_group=None) -> LossOutput:
        labels = batch["labels"]
        mask = batch.get("loss_mask")
        mask = torch.ones_like(labels, dtype=torch.float32) if mask is None else mask.float()
        mask = mask * (labels >= 0)
        nll = -token_log_probs(logits, labels, tp_group)
        loss_sum = (nll * mask).sum()
        return LossOutput(loss_sum, mask.sum(), {})

    def units(self, batch) -> torch.Tensor:
        labels = batch["labels"]
        mask = batch.get("loss_mask")
        mask = torch.ones_like(labels, dtype=torch.float32) if mask is None else mask.float()
        return (mask * (labels >= 0)).sum()


def sequence_log_probs(logits, labels, loss_mask, tp_group=None) -> torch.Tensor:
    """Sum of log-probs over each row's completion tokens, shape (batch,)."""
    return (token_log_probs(logits, labels, tp_group) * loss_mask.float()).sum(-1)


def dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss (Rafailov et al. 2023, eq. 7), with the conservative label smoothing of
    Mitchell (2023): -(1-e) log s(b*m) - e log s(-b*m), m = policy margin - reference margin."""
    margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)


class DPOLoss:
    """Direct preference optimization over a batch laid out as [chosen rows; rejected rows].

    The batch carries ``ref_chosen_logp`` / ``ref_rejected_logp`` (from the data, or from a frozen
    reference model run by the trainer) and an optional per-pair ``weight`` (1 if absent).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, variant: str = "sigmoid"):
        if variant != "sigmoid":
            raise ValueError(f"loss.dpo_variant: unknown variant {variant!r}, allowed: 'sigmoid'")
        self.beta, self.label_smoothing = beta, label_smoothing

    def __call__(self, logits, batch, tp_group=None) -> LossOutput:
        seq_logp = sequence_log_probs(logits, batch["labels"], batch["loss_mask"], tp_group)
        chosen, rejected = seq_logp.chunk(2)
        ref_chosen, ref_rejected = batch["ref_chosen_logp"].float(), batch["ref_rejected_logp"].float()
        per_pair = dpo_sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing)
        weight = batch.get("weight")
        weight = torch.ones_like(per_pair) if weight is None else weight.float()
        reward_margin = self.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        metrics = {
            "dpo/reward_margin": (reward_margin * weight).sum().detach(),
            "dpo/accuracy": ((reward_margin > 0).float() * weight).sum().detach(),
        }
        # Weights scale each pair's loss (judge-score weighting is this project's extension); the
        # mean is still over pairs, so unweighted and weight-1 batches give identical losses.
        return LossOutput((per_pair * weight).sum(), self.units(batch), metrics)

    def units(self, batch) -> torch.Tensor:
        return torch.tensor(float(batch["labels"].shape[0] // 2))


def build_loss(cfg) -> LossFn:
    """cfg: megatron_phi4.config.LossConfig."""
    if cfg.type == "lm":
        return LMLoss()
    if cfg.type == "dpo":
        return DPOLoss(cfg.dpo_beta, cfg.dpo_label_smoothing, cfg.dpo_variant)
    raise ValueError(f"loss.type: unknown loss {cfg.type!r}, allowed: 'lm', 'dpo'")
