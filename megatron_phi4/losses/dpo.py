"""Direct preference optimization against a reference (frozen model, or log-probs in the data).

The stage loss of a DPO stage: it turns the per-token label log-probs of the last pipeline stage
(computed by the head a chunk of tokens at a time, vocab-parallel under TP: the 100352-wide
logits never exist whole) into each row's summed completion log-prob with
:func:`~megatron_phi4.losses.base.sequence_log_probs`, then applies the objective named by
``loss.dpo_loss_type`` (:mod:`~megatron_phi4.losses.dpo_objectives`, TRL's names and formulas).

Token-level DPO on Pivotal Token Search pairs needs nothing special here: the prompt holds the
question and the prefix, each completion is one token, so the loss mask has exactly one 1 per row
and only that position's log-prob enters the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_phi4.losses.base import LossOutput, sequence_log_probs
from megatron_phi4.losses.dpo_objectives import (
    BATCH_SORTED_TYPES, DEFAULT_DISCOPOP_TAU, check_dpo_options, dpo_losses,
)


def dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss (Rafailov et al. 2023, eq. 7), with the conservative label smoothing of
    Mitchell (2023): -(1-e) log s(b*m) - e log s(-b*m), m = policy margin - reference margin.
    (``dpo_losses(..., loss_type="cdpo")``; with e = 0, TRL's ``sigmoid``.)"""
    margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)


class DPOLoss:
    """DPO over a batch laid out as ``[chosen rows; rejected rows]`` (collate_preference).

    The batch carries ``ref_chosen_logp`` / ``ref_rejected_logp`` (from the data, or from a frozen
    reference model run by the trainer) and an optional per-pair ``weight`` (1 if absent). The
    weight multiplies the pair's loss -- an extension of the paper, whose judge-guided pairs carry
    a binary label only; the mean stays over pairs, so weight-1 batches give the plain loss.

    Metrics (sums over pairs, unweighted; the engine divides by the global pair count, giving
    means): ``dpo/reward_margin`` (b*(c - r)), ``dpo/accuracy`` (chosen implicit reward >
    rejected), ``dpo/chosen_reward`` (b*c) and ``dpo/rejected_reward`` (b*r), with c, r the
    chosen / rejected log-ratios against the reference, as TRL logs them.

    ``aot`` / ``aot_unpaired`` sort within the micro-batch this loss sees (TRL sorts within the
    per-device batch); the engine's micro-batches are the same consecutive chunks of the global
    batch under every TP x PP x DP layout, so the loss depends on ``micro_batch_size`` but not on
    the layout. Sorting detaches losses from pairs, so they refuse weights other than 1.

    ``sft_weight`` w > 0 adds TRL's ``"sft"`` loss type beside the preference one (TRL:
    ``loss_type=[<type>, "sft"], loss_weights=[1.0, w]``; RPO / MPO): w times the negative
    log-likelihood of the chosen completions, averaged over the chosen tokens of the micro-batch
    (TRL averages over the tokens of its per-device batch), so a micro-batch of P pairs adds
    ``w * P * token-mean NLL`` to the loss sum. Per-pair weights scale the preference term only
    (TRL has none; its ``sft`` term is a batch mean). Logged as ``dpo/sft_nll`` (the token-mean NLL).
    """

    inputs = "label_log_probs"  # the head computes them chunk by chunk (losses/base.py)

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                 discopop_tau: float = DEFAULT_DISCOPOP_TAU, sft_weight: float = 0.0):
        check_dpo_options(loss_type, beta, label_smoothing, discopop_tau, sft_weight)
        self.beta, self.label_smoothing = float(beta), float(label_smoothing)
        self.loss_type, self.discopop_tau = loss_type, float(discopop_tau)
        self.sft_weight = float(sft_weight)

    def __call__(self, logits, batch, tp_group=None) -> LossOutput:
        mask = batch["loss_mask"]
        seq_logp = sequence_log_probs(logits, batch["labels"], mask, tp_group)
        chosen, rejected = seq_logp.chunk(2)
        chosen_len, rejected_len = mask.float().sum(-1).chunk(2)  # completion tokens per row
        ref_chosen = batch["ref_chosen_logp"].to(chosen.device, torch.float32)
        ref_rejected = batch["ref_rejected_logp"].to(chosen.device, torch.float32)
        per_pair = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, loss_type=self.loss_type,
                              beta=self.beta, label_smoothing=self.label_smoothing,
                              chosen_lengths=chosen_len, rejected_lengths=rejected_len,
                              discopop_tau=self.discopop_tau)
        weight = batch.get("weight")
        if weight is not None:
            weight = weight.to(per_pair.device, torch.float32)
            if self.loss_type in BATCH_SORTED_TYPES and not bool((weight == 1).all()):
                raise ValueError(f"weight: loss.dpo_loss_type {self.loss_type!r} sorts log-ratios across the "
                                 "batch, so its losses do not belong to pairs and per-pair weights cannot apply; "
                                 "use weight 1 (or omit it) or another loss type")
            per_pair = per_pair * weight
        loss_sum = per_pair.sum()
        if self.sft_weight:
            sft_nll = -chosen.sum() / chosen_len.sum().clamp(min=1.0)  # token mean over this micro-batch
            loss_sum = loss_sum + self.sft_weight * chosen.shape[0] * sft_nll
        with torch.no_grad():
            chosen_reward = self.beta * (chosen - ref_chosen)
            rejected_reward = self.beta * (rejected - ref_rejected)
            margin = chosen_reward - rejected_reward
            metrics = {
                "dpo/reward_margin": margin.sum(),
                "dpo/accuracy": (margin > 0).float().sum(),
                "dpo/chosen_reward": chosen_reward.sum(),
                "dpo/rejected_reward": rejected_reward.sum(),
            }
            if self.sft_weight:
                metrics["dpo/sft_nll"] = sft_nll.detach() * chosen.shape[0]
        return LossOutput(loss_sum, self.units(batch), metrics)

    def units(self, batch) -> torch.Tensor:
        return torch.tensor(float(batch["labels"].shape[0] // 2))


def build_dpo_loss(cfg) -> DPOLoss:
    """Factory registered as ``loss.type: dpo`` (cfg: LossConfig)."""
    return DPOLoss(cfg.dpo_beta, cfg.dpo_label_smoothing, cfg.dpo_loss_type, cfg.dpo_discopop_tau,
                   cfg.dpo_sft_weight)
