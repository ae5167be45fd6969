"""Losses the engine asks the last pipeline stage to compute (one module per family).

``build_loss(loss_cfg)`` looks the type up in ``megatron_phi4.registry.LOSSES``; add a loss by
registering a factory there. See ``base.py`` for the sum-and-units contract every loss follows.
"""
from megatron_phi4.losses.base import (
    IGNORE_INDEX, LabelLogProbs, LossFn, LossOutput, loss_inputs, sequence_log_probs, token_log_probs,
)
from megatron_phi4.losses.dpo import DPOLoss, dpo_sigmoid_loss
from megatron_phi4.losses.dpo_objectives import DPO_LOSS_TYPES, dpo_losses
from megatron_phi4.losses.lm import LMLoss

__all__ = ["IGNORE_INDEX", "LabelLogProbs", "loss_inputs", "LossFn", "LossOutput", "token_log_probs",
           "sequence_log_probs", "LMLoss", "DPOLoss", "dpo_sigmoid_loss", "dpo_losses", "DPO_LOSS_TYPES", "build_loss"]


def build_loss(cfg) -> LossFn:
    """cfg: megatron_phi4.config.LossConfig."""
    from megatron_phi4.registry import LOSSES

    return LOSSES.build(cfg.type, cfg)
