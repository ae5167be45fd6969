"""DPO objectives (megatron_phi4.losses.dpo_losses) against TRL 1.16's own code.

The reference value is computed by calling ``trl.DPOTrainer._compute_loss`` itself -- the method
TRL's trainer runs every step -- on a stub ``self`` holding the attributes it reads and a stub model
whose per-token log-probs sum to the given sequence log-probs (the completion mask carries the
lengths that ``ipo`` / ``sigmoid_norm`` divide by). No formula is re-typed for the comparison;
only ``cdpo`` (this project's name, not TRL's) is checked against Mitchell (2023) by hand.
"""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from megatron_phi4.config import ConfigError, LossConfig
from megatron_phi4.losses import DPO_LOSS_TYPES, dpo_losses
from megatron_phi4.losses.dpo_objectives import (
    BATCH_SORTED_TYPES, LABEL_SMOOTHING_TYPES, LENGTH_NORMALIZED_TYPES, TRL_LOSS_TYPES, check_dpo_options,
)

trl = pytest.importorskip("trl")

B = 16
BETA = 0.1
# exo_pair needs smoothing > 0 in TRL; 1e-3 is the EXO paper's recommendation
BASE_SMOOTHING = {"exo_pair": 1e-3}
SMOOTHING_CASES = [("robust", 0.1), ("robust", 0.3), ("exo_pair", 0.2), ("aot", 0.1), ("aot", 0.3),
                   ("aot_unpaired", 0.1), ("aot_unpaired", 0.3)]


@pytest.fixture(scope="module")
def trl_compute_loss():
    from trl.trainer.dpo_trainer import DPOTrainer

    assert trl.__version__.startswith("1.16"), f"reference is TRL 1.16, found {trl.__version__}"
    return DPOTrainer._compute_loss


def random_inputs(seed: int, dtype=torch.float64, scale: float = 3.0):
    """Sequence log-probs of B pairs (policy near the reference) and completion lengths in tokens."""
    g = torch.Generator().manual_seed(seed)
    rc = -torch.rand(B, generator=g, dtype=dtype) * 60 - 5
    rr = -torch.rand(B, generator=g, dtype=dtype) * 60 - 5
    pc = rc + torch.randn(B, generator=g, dtype=dtype) * scale
    pr = rr + torch.randn(B, generator=g, dtype=dtype) * scale
    clen = torch.randint(1, 24, (B,), generator=g)
    rlen = torch.randint(1, 24, (B,), generator=g)
    return pc, pr, rc, rr, clen, rlen


def trl_loss(compute_loss, pc, pr, rc, rr, clen, rlen, loss_type, beta=BETA, eps=0.0, tau=0.05, sft_weight=None):
    """TRL 1.16's batch loss for these sequence log-probs (differentiable w.r.t. pc and pr);
    ``sft_weight``: TRL's multi-loss ``loss_type=[loss_type, "sft"], loss_weights=[1.0, sft_weight]``."""
    n = pc.shape[0]
    lengths = torch.cat([clen, rlen])
    width = int(lengths.max()) + 2  # at least one prompt token on the left of every completion
    completion_mask = torch.zeros(2 * n, width, dtype=torch.long)
    for i, k in enumerate(lengths.tolist()):
        completion_mask[i, width - k:] = 1
    # per-token log-probs over the shifted positions: each row's whole sum at its last token
    logps = torch.cat([pc, pr])
    per_token = torch.cat([torch.zeros(2 * n, width - 2, dtype=logps.dtype), logps[:, None]], dim=1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token),
                              is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    model_fn = lambda **kw: outputs  # noqa: E731
    stub = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                                                 gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type] + (["sft"] if sft_weight is not None else []),
        loss_weights=[1.0] + ([sft_weight] if sft_weight is not None else []), beta=beta, label_smoothing=eps, use_weighting=False,
        args=SimpleNamespace(discopop_tau=tau), _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * n, width, dtype=torch.long),
              "attention_mask": torch.ones(2 * n, width, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return compute_loss(stub, model_fn, inputs, return_outputs=False)


def ours(pc, pr, rc, rr, clen, rlen, loss_type, beta=BETA, eps=0.0, **kw):
    return dpo_losses(pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=eps,
                      chosen_lengths=clen, rejected_lengths=rlen, **kw)


def test_loss_type_lists_agree_with_config_and_trl():
    assert set(TRL_LOSS_TYPES) == {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "sppo_hard", "aot",
                                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"}
    assert DPO_LOSS_TYPES == LossConfig.DPO_LOSS_TYPES
    assert LABEL_SMOOTHING_TYPES == LossConfig.DPO_LABEL_SMOOTHING_TYPES


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mean_equals_trl_batch_loss(trl_compute_loss, loss_type, dtype):
    for seed in range(3):
        pc, pr, rc, rr, clen, rlen = random_inputs(seed, dtype, scale=[0.5, 3.0, 20.0][seed])
        eps = BASE_SMOOTHING.get(loss_type, 0.0)
        got = ours(pc, pr, rc, rr, clen, rlen, loss_type, eps=eps)
        assert got.shape == (B,) and got.dtype == dtype
        ref = trl_loss(trl_compute_loss, pc, pr, rc, rr, clen, rlen, loss_type, eps=eps)
        assert abs(got.mean().item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item())), (seed, got.mean(), ref)


@pytest.mark.parametrize("loss_type,eps", SMOOTHING_CASES)
def test_label_smoothing_equals_trl_where_trl_uses_it(trl_compute_loss, loss_type, eps):
    pc, pr, rc, rr, clen, rlen = random_inputs(7)
    got = ours(pc, pr, rc, rr, clen, rlen, loss_type, eps=eps).mean()
    ref = trl_loss(trl_compute_loss, pc, pr, rc, rr, clen, rlen, loss_type, eps=eps)
    assert abs(got.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))
    plain = ours(pc, pr, rc, rr, clen, rlen, loss_type, eps=BASE_SMOOTHING.get(loss_type, 0.0)).mean()
    assert abs(got.item() - plain.item()) > 1e-3  # smoothing really acts


def test_discopop_tau_is_passed_through(trl_compute_loss):
    pc, pr, rc, rr, clen, rlen = random_inputs(3)
    for tau in (0.05, 0.5):
        got = ours(pc, pr, rc, rr, clen, rlen, "discopop", discopop_tau=tau).mean()
        ref = trl_loss(trl_compute_loss, pc, pr, rc, rr, clen, rlen, "discopop", tau=tau)
        assert abs(got.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))
    assert dpo_losses(pc, pr, rc, rr, loss_type="discopop", beta=BETA).mean() == pytest.approx(
        ours(pc, pr, rc, rr, clen, rlen, "discopop", discopop_tau=0.05).mean().item(), rel=1e-12)  # default 0.05


def test_discopop_stays_finite_where_the_naive_product_overflows():
    z = torch.tensor([-2000.0, -95.0, 0.0, 95.0], dtype=torch.float32)  # beta * margin
    zero = torch.zeros_like(z)
    out = dpo_losses(z, zero, zero, zero, loss_type="discopop", beta=1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:2], -torch.nn.functional.logsigmoid(z[:2]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_gradients_equal_trl_and_finite_differences(trl_compute_loss, loss_type):
    pc, pr, rc, rr, clen, rlen = random_inputs(11)
    eps = BASE_SMOOTHING.get(loss_type, 0.0)
    a_c, a_r = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    ours(a_c, a_r, rc, rr, clen, rlen, loss_type, eps=eps).mean().backward()
    b_c, b_r = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    trl_loss(trl_compute_loss, b_c, b_r, rc, rr, clen, rlen, loss_type, eps=eps).backward()
    torch.testing.assert_close(a_c.grad, b_c.grad, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(a_r.grad, b_r.grad, rtol=1e-6, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda c, r: ours(c, r, rc, rr, clen, rlen, loss_type, eps=eps).mean(),
        (pc.clone().requires_grad_(), pr.clone().requires_grad_()))


@pytest.mark.parametrize("loss_type", [t for t in DPO_LOSS_TYPES if t != "discopop"])
def test_gradient_prefers_chosen_at_the_reference(loss_type):
    """Where policy == reference, raising the chosen log-prob or lowering the rejected one must
    not raise the loss, and together they must lower it. (Not discopop: see the next test.)"""
    pc = torch.full((4,), -20.0, dtype=torch.float64, requires_grad=True)
    pr = torch.full((4,), -25.0, dtype=torch.float64, requires_grad=True)
    lengths = torch.full((4,), 5)
    eps = BASE_SMOOTHING.get(loss_type, 0.1 if loss_type == "cdpo" else 0.0)
    dpo_losses(pc, pr, pc.detach(), pr.detach(), loss_type=loss_type, beta=BETA, label_smoothing=eps,
               chosen_lengths=lengths, rejected_lengths=lengths).sum().backward()
    assert (pc.grad <= 1e-12).all() and (pr.grad >= -1e-12).all(), (pc.grad, pr.grad)
    assert (pc.grad - pr.grad < 0).all()


def test_discopop_slope_at_zero_margin_is_the_analytic_one():
    """DiscoPOP's loss is not monotone near a zero margin (a known property of the discovered
    objective, and TRL's too): d/dz at z = 0 is (1 - ln 2) / (4 tau) - 3/4, positive for tau = 0.05."""
    for tau in (0.05, 2.0):
        pc = torch.full((2,), -20.0, dtype=torch.float64, requires_grad=True)
        pr = torch.full((2,), -25.0, dtype=torch.float64)
        dpo_losses(pc, pr, pc.detach(), pr, loss_type="discopop", beta=BETA, discopop_tau=tau).sum().backward()
        expected = BETA * ((1 - math.log(2)) / (4 * tau) - 0.75)
        torch.testing.assert_close(pc.grad, torch.full((2,), expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_cdpo_is_mitchells_conservative_dpo_and_sigmoid_at_zero_smoothing():
    pc, pr, rc, rr, clen, rlen = random_inputs(5)
    eps = 0.2
    m = BETA * ((pc - pr) - (rc - rr))
    expected = -(1 - eps) * torch.log(torch.sigmoid(m)) - eps * torch.log(torch.sigmoid(-m))
    torch.testing.assert_close(ours(pc, pr, rc, rr, clen, rlen, "cdpo", eps=eps), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(ours(pc, pr, rc, rr, clen, rlen, "cdpo"), ours(pc, pr, rc, rr, clen, rlen, "sigmoid"))


def test_aot_losses_are_per_sorted_position_and_one_pair_is_sigmoid():
    pc, pr, rc, rr, clen, rlen = random_inputs(9)
    per = ours(pc, pr, rc, rr, clen, rlen, "aot")
    perm = torch.randperm(B)
    permuted = ours(pc[perm], pr[perm], rc[perm], rr[perm], clen[perm], rlen[perm], "aot")
    torch.testing.assert_close(per, permuted)  # a function of the batch's sorted margins only
    assert not torch.allclose(per, ours(pc, pr, rc, rr, clen, rlen, "sigmoid"))
    one = [t[:1] for t in (pc, pr, rc, rr, clen, rlen)]
    for t in BATCH_SORTED_TYPES:
        torch.testing.assert_close(ours(*one, t), ours(*one, "sigmoid"))


def test_bad_arguments_name_the_argument():
    pc, pr, rc, rr, clen, rlen = random_inputs(1)
    with pytest.raises(ValueError, match="loss_type: got 'kto'"):
        dpo_losses(pc, pr, rc, rr, loss_type="kto", beta=BETA)
    with pytest.raises(ValueError, match="beta"):
        dpo_losses(pc, pr, rc, rr, loss_type="sigmoid", beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing: 'sigmoid' does not use it"):
        dpo_losses(pc, pr, rc, rr, loss_type="sigmoid", beta=BETA, label_smoothing=0.1)
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_losses(pc, pr, rc, rr, loss_type="exo_pair", beta=BETA)
    with pytest.raises(ValueError, match=r"label_smoothing: must be in \[0, 0.5\)"):
        dpo_losses(pc, pr, rc, rr, loss_type="robust", beta=BETA, label_smoothing=0.5)
    for t in LENGTH_NORMALIZED_TYPES:
        with pytest.raises(ValueError, match="chosen_lengths: required"):
            dpo_losses(pc, pr, rc, rr, loss_type=t, beta=BETA)
    with pytest.raises(ValueError, match="rejected_lengths: shape"):
        dpo_losses(pc, pr, rc, rr, loss_type="ipo", beta=BETA, chosen_lengths=clen, rejected_lengths=rlen[:3])
    with pytest.raises(ValueError, match="same shape"):
        dpo_losses(pc, pr[:3], rc, rr, loss_type="sigmoid", beta=BETA)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_config_validation_agrees_with_the_loss(loss_type, eps):
    cfg = LossConfig(type="dpo", dpo_loss_type=loss_type, dpo_label_smoothing=eps)
    try:
        check_dpo_options(loss_type, BETA, eps)
        loss_ok = True
    except ValueError:
        loss_ok = False
    try:
        cfg.validate()
        cfg_ok = True
    except ConfigError as e:
        assert "loss.dpo_label_smoothing" in str(e)
        cfg_ok = False
    assert loss_ok == cfg_ok
    with pytest.raises(ConfigError, match="loss.dpo_loss_type: got 'nope'"):
        LossConfig(type="dpo", dpo_loss_type="nope").validate()
    assert math.isclose(LossConfig().dpo_discopop_tau, 0.05)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "aot"])
@pytest.mark.parametrize("sft_weight", [0.3, 1.0])
def test_stage_loss_with_sft_weight_equals_trl_multi_loss(trl_compute_loss, loss_type, sft_weight):
    """DPOLoss(sft_weight=w) on one micro-batch == TRL's loss_type=[<type>, "sft"], loss_weights=[1, w]
    (completions of different lengths: TRL's sft term is a mean over the batch's chosen tokens)."""
    from megatron_phi4.losses import DPOLoss
    from megatron_phi4.losses.base import LabelLogProbs

    pc, pr, rc, rr, clen, rlen = random_inputs(5)
    ref = trl_loss(trl_compute_loss, pc, pr, rc, rr, clen, rlen, loss_type, sft_weight=sft_weight)
    width = int(torch.cat([clen, rlen]).max()) + 2
    mask = torch.zeros(2 * B, width)
    values = torch.zeros(2 * B, width, dtype=pc.dtype)
    for i, k in enumerate(torch.cat([clen, rlen]).tolist()):
        mask[i, width - k:] = 1
        values[i, -1] = torch.cat([pc, pr])[i]  # each row's sequence log-prob on its last completion token
    batch = {"labels": torch.zeros(2 * B, width, dtype=torch.long), "loss_mask": mask,
             "ref_chosen_logp": rc, "ref_rejected_logp": rr}
    out = DPOLoss(beta=BETA, loss_type=loss_type, sft_weight=sft_weight)(LabelLogProbs(values.float()), batch)
    torch.testing.assert_close((out.loss_sum / out.units).double(), ref, rtol=1e-6, atol=0)
    # the sft term is really there: without it the value is TRL's single-type loss
    plain = DPOLoss(beta=BETA, loss_type=loss_type)(LabelLogProbs(values.float()), batch)
    nll = float(-pc.sum() / clen.sum())
    torch.testing.assert_close(float((out.loss_sum - plain.loss_sum) / out.units), sft_weight * nll, rtol=1e-5, atol=0)
    torch.testing.assert_close(float(out.metrics["dpo/sft_nll"] / out.units), nll, rtol=1e-5, atol=0)


def test_sft_weight_is_validated_by_the_loss_and_the_config():
    from megatron_phi4.losses import DPOLoss

    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sft_weight"):
            DPOLoss(sft_weight=bad)
        with pytest.raises(ConfigError, match="dpo_sft_weight"):
            LossConfig(type="dpo", dpo_sft_weight=bad).validate()
