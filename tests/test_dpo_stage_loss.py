"""The DPO stage loss (DPOLoss): loss types from the config, per-pair weights, metrics, and
token-level DPO on Pivotal Token Search pairs (one-token completions)."""
from __future__ import annotations

import pytest
import torch

from megatron_phi4.config import LossConfig
from megatron_phi4.data.preference import collate_preference
from megatron_phi4.losses import DPO_LOSS_TYPES, DPOLoss, build_loss, dpo_losses, sequence_log_probs
from megatron_phi4.losses.dpo_objectives import BATCH_SORTED_TYPES, LABEL_SMOOTHING_TYPES

VOCAB, PAIRS, SEQ = 17, 3, 9


def smoothing_for(loss_type):
    return 0.1 if loss_type in LABEL_SMOOTHING_TYPES else 0.0


def random_batch(seed=0, weights=True):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (2 * PAIRS, SEQ), generator=g)
    mask = torch.zeros(2 * PAIRS, SEQ)
    for row in range(2 * PAIRS):  # completions of different lengths
        mask[row, int(torch.randint(2, SEQ - 1, (1,), generator=g)):] = 1
    batch = {"labels": labels, "loss_mask": mask,
             "ref_chosen_logp": -torch.rand(PAIRS, generator=g) * 10 - 10,
             "ref_rejected_logp": -torch.rand(PAIRS, generator=g) * 10 - 10}
    if weights:
        batch["weight"] = torch.tensor([0.5, 1.0, 2.5])
    return batch, torch.randn(2 * PAIRS, SEQ, VOCAB, generator=g)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_stage_loss_is_the_weighted_sum_of_dpo_losses(loss_type):
    sorted_type = loss_type in BATCH_SORTED_TYPES
    batch, logits = random_batch(weights=not sorted_type)
    eps = smoothing_for(loss_type)
    out = DPOLoss(beta=0.2, label_smoothing=eps, loss_type=loss_type)(logits, batch)
    logp = sequence_log_probs(logits, batch["labels"], batch["loss_mask"])
    lengths = batch["loss_mask"].sum(-1)
    per_pair = dpo_losses(logp[:PAIRS], logp[PAIRS:], batch["ref_chosen_logp"], batch["ref_rejected_logp"],
                          loss_type=loss_type, beta=0.2, label_smoothing=eps,
                          chosen_lengths=lengths[:PAIRS], rejected_lengths=lengths[PAIRS:])
    weight = torch.ones(PAIRS) if sorted_type else batch["weight"]
    torch.testing.assert_close(out.loss_sum, (per_pair * weight).sum(), rtol=1e-6, atol=0)
    assert out.units.item() == PAIRS


def test_metrics_are_unweighted_sums_over_pairs():
    batch, logits = random_batch()
    out = DPOLoss(beta=0.2)(logits, batch)
    logp = sequence_log_probs(logits, batch["labels"], batch["loss_mask"])
    chosen_r = 0.2 * (logp[:PAIRS] - batch["ref_chosen_logp"])
    rejected_r = 0.2 * (logp[PAIRS:] - batch["ref_rejected_logp"])
    m = out.metrics
    torch.testing.assert_close(m["dpo/chosen_reward"], chosen_r.sum())
    torch.testing.assert_close(m["dpo/rejected_reward"], rejected_r.sum())
    torch.testing.assert_close(m["dpo/reward_margin"], (chosen_r - rejected_r).sum())
    assert m["dpo/accuracy"].item() == float((chosen_r > rejected_r).sum())
    assert all(not v.requires_grad for v in m.values())


def test_batch_sorted_types_refuse_per_pair_weights():
    batch, logits = random_batch()
    for t in BATCH_SORTED_TYPES:
        with pytest.raises(ValueError, match=f"weight: loss.dpo_loss_type '{t}' sorts"):
            DPOLoss(loss_type=t)(logits, batch)
        ones = dict(batch, weight=torch.ones(PAIRS))
        assert torch.isfinite(DPOLoss(loss_type=t)(logits, ones).loss_sum)


def test_build_loss_takes_the_type_from_the_stage_config():
    cfg = LossConfig(type="dpo", dpo_beta=0.3, dpo_loss_type="robust", dpo_label_smoothing=0.2,
                     dpo_discopop_tau=0.5)
    cfg.validate()
    loss = build_loss(cfg)
    assert isinstance(loss, DPOLoss)
    assert (loss.loss_type, loss.beta, loss.label_smoothing, loss.discopop_tau) == ("robust", 0.3, 0.2, 0.5)
    with pytest.raises(ValueError, match="loss_type"):
        DPOLoss(loss_type="simpo")


# ------------------------------------------------------------------ token-level DPO (PTS pairs)
def pts_pairs():
    """Prompt = question + prefix; chosen / rejected = one token each (as PTS emits them)."""
    return [{"prompt_ids": [1, 2, 3, 4, 5], "chosen_ids": [7], "rejected_ids": [8]},
            {"prompt_ids": [9, 10, 11], "chosen_ids": [12], "rejected_ids": [13]},
            {"prompt_ids": [3, 4, 5, 6, 7, 8, 9], "chosen_ids": [14], "rejected_ids": [15]}]


def test_one_token_completions_give_one_mask_position_per_row():
    pairs = pts_pairs()
    b = collate_preference(pairs, pad_id=0, pad_to_multiple_of=4)
    assert (b["loss_mask"].sum(-1) == 1).all()
    for row, p in enumerate(pairs + pairs):
        pos = int(b["loss_mask"][row].nonzero())
        assert pos == len(p["prompt_ids"]) - 1  # the last prompt (prefix) token predicts the completion
        kind = "chosen_ids" if row < len(pairs) else "rejected_ids"
        assert b["labels"][row, pos].item() == p[kind][0]
        assert b["input_ids"][row, :pos + 1].tolist() == p["prompt_ids"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust", "aot", "discopop"])
def test_token_level_gradients_reach_only_the_pivotal_position(loss_type):
    pairs = pts_pairs()
    b = collate_preference(pairs, pad_id=0, pad_to_multiple_of=4)
    n = len(pairs)
    b["ref_chosen_logp"], b["ref_rejected_logp"] = -torch.rand(n) - 2, -torch.rand(n) - 2
    logits = torch.randn(2 * n, b["labels"].shape[1], VOCAB, requires_grad=True)
    out = DPOLoss(beta=0.5, label_smoothing=smoothing_for(loss_type), loss_type=loss_type)(logits, b)
    out.loss_sum.backward()
    grad_norm = logits.grad.norm(dim=-1)  # (rows, positions)
    pivotal = b["loss_mask"].bool()
    assert (grad_norm[pivotal] > 0).all()
    assert (grad_norm[~pivotal] == 0).all()  # exactly zero: no other position's logit is touched
    # and the loss is the objective on those single log-probs
    lp = torch.log_softmax(logits.detach(), -1).gather(-1, b["labels"][..., None])[..., 0][pivotal]
    expected = dpo_losses(lp[:n], lp[n:], b["ref_chosen_logp"], b["ref_rejected_logp"], loss_type=loss_type,
                          beta=0.5, label_smoothing=smoothing_for(loss_type),
                          chosen_lengths=torch.ones(n), rejected_lengths=torch.ones(n)).sum()
    torch.testing.assert_close(out.loss_sum.detach(), expected, rtol=1e-6, atol=0)
