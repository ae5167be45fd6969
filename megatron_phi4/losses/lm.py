"""Masked next-token cross entropy (pre-training, mid-training, SFT)."""
from __future__ import annotations

import torch

from megatron_phi4.losses.base import LossOutput, token_log_probs


def _mask(batch) -> torch.Tensor:
    labels = batch["labels"]
    mask = batch.get("loss_mask")
    mask = torch.ones_like(labels, dtype=torch.float32) if mask is None else mask.float()
    return mask * (labels >= 0)


class LMLoss:
    """Next-token cross entropy over tokens where ``loss_mask`` is 1 (SFT trains only on assistant turns)."""

    inputs = "label_log_probs"  # the head computes them chunk by chunk (losses/base.py)

    def __call__(self, logits, batch, tp_group=None) -> LossOutput:
        mask = _mask(batch)
        nll = -token_log_probs(logits, batch["labels"], tp_group)
        return LossOutput((nll * mask).sum(), mask.sum(), {})

    def units(self, batch) -> torch.Tensor:
        return _mask(batch).sum()


def build_lm_loss(cfg=None) -> LMLoss:
    """Factory registered as ``loss.type: lm`` (cfg: LossConfig, unused)."""
    return LMLoss()
