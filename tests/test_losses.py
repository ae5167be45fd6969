"""Losses against their published formulas (fp32, CPU)."""
import math

import torch
import torch.nn.functional as F

from megatron_phi4.config import LossConfig
from megatron_phi4.losses import DPOLoss, LMLoss, build_loss, dpo_sigmoid_loss, token_log_probs


def test_token_log_probs_match_log_softmax_and_ignore_negative_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 1] = -100
    out = token_log_probs(logits, targets)
    ref = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ref[0, 1] = 0.0
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)


def test_lm_loss_equals_masked_cross_entropy_sum():
    torch.manual_seed(1)
    logits = torch.randn(3, 7, 13)
    labels = torch.randint(0, 13, (3, 7))
    mask = (torch.rand(3, 7) > 0.3).float()
    out = LMLoss()(logits, {"labels": labels, "loss_mask": mask})
    ce = F.cross_entropy(logits.reshape(-1, 13), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(out.loss_sum, (ce * mask.reshape(-1)).sum(), rtol=1e-6, atol=0)
    assert out.units.item() == mask.sum().item()
    assert LMLoss().units({"labels": labels, "loss_mask": mask}).item() == mask.sum().item()


def test_dpo_sigmoid_loss_matches_rafailov_eq7_by_hand():
    beta, pc, pr, rc, rr = 0.1, -3.0, -5.0, -4.0, -4.5
    margin = (pc - pr) - (rc - rr)
    expected = -math.log(1.0 / (1.0 + math.exp(-beta * margin)))
    got = dpo_sigmoid_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta=beta)
    assert abs(got.item() - expected) < 1e-7
    eps = 0.2
    smoothed = dpo_sigmoid_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta=beta, label_smoothing=eps)
    expected_s = (1 - eps) * expected - eps * math.log(1.0 / (1.0 + math.exp(beta * margin)))
    assert abs(smoothed.item() - expected_s) < 1e-7


def test_dpo_loss_over_chosen_rejected_rows_with_weights():
    torch.manual_seed(2)
    vocab, pairs, seq = 9, 2, 6
    logits = torch.randn(2 * pairs, seq, vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (2 * pairs, seq))
    mask = torch.zeros(2 * pairs, seq)
    mask[:, 3:] = 1  # completion tokens only
    batch = {"labels": labels, "loss_mask": mask, "ref_chosen_logp": torch.tensor([-7.0, -6.0]),
             "ref_rejected_logp": torch.tensor([-6.5, -8.0]), "weight": torch.tensor([1.0, 3.0])}
    out = DPOLoss(beta=0.5)(logits, batch)
    logp = (torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0] * mask).sum(-1)
    per_pair = -F.logsigmoid(0.5 * ((logp[:2] - logp[2:]) - (batch["ref_chosen_logp"] - batch["ref_rejected_logp"])))
    torch.testing.assert_close(out.loss_sum, (per_pair * batch["weight"]).sum(), rtol=1e-6, atol=0)
    assert out.units.item() == pairs
    out.loss_sum.backward()
    assert logits.grad[:, :2].abs().sum() < 1e-6 * logits.grad.abs().sum()  # with logits at position < 3 masked
    assert out.metrics["dpo/accuracy"].item() in (0.0, 1.0, 2.0)  # pairs counted, unweighted


def test_build_loss_from_config():
    assert isinstance(build_loss(LossConfig(type="lm")), LMLoss)
    dpo = build_loss(LossConfig(type="dpo", dpo_beta=0.3))
    assert isinstance(dpo, DPOLoss) and dpo.beta == 0.3
