"""Losses against their published formulas (fp32, CPU)."""
import math

import pytest
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


# --------------------------------------------------------------------------- the chunked, fused head
def _head_data(n=37, hidden=16, vocab=512, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.3
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[[0, 5, 6]] = -100
    upstream = torch.randn(n, generator=g)
    return x, w, targets, upstream


def _rel(got, ref):
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("chunk", [1, 7, 37, 1000])
def test_chunked_head_log_probs_equal_log_softmax_of_the_whole_logits(chunk):
    from megatron_phi4.distributed.vocab_parallel import chunked_head_log_probs

    x, w, targets, upstream = _head_data()
    results = []
    for fn in (lambda x, w: token_log_probs(x @ w.t(), targets),
               lambda x, w: chunked_head_log_probs(x, w, targets, chunk_tokens=chunk)):
        xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logp = fn(xl, wl)
        (logp * upstream).sum().backward()
        results.append((logp.detach(), xl.grad, wl.grad))
    (ref_lp, ref_gx, ref_gw), (lp, gx, gw) = results
    assert lp.dtype == torch.float32 and torch.all(lp[[0, 5, 6]] == 0)
    for got, ref in ((lp, ref_lp), (gx, ref_gx), (gw, ref_gw)):
        assert _rel(got, ref) < 1e-5


def test_chunked_head_holds_one_chunk_of_logits_at_a_time():
    from megatron_phi4.distributed.vocab_parallel import chunked_head_log_probs
    from tests.tensor_sizes import LargestTensor

    x, w, targets, upstream = _head_data(n=256)
    x.requires_grad_(True), w.requires_grad_(True)
    chunk = 32
    with LargestTensor() as big:
        (chunked_head_log_probs(x, w, targets, chunk_tokens=chunk) * upstream).sum().backward()
    # the whole logits would be 256 x 512 = 131072 elements; one chunk is 32 x 512
    assert big.numel <= chunk * w.shape[0], f"{big.op} made a tensor of {big.numel} elements"


def test_chunked_head_returns_a_tensor_in_the_targets_shape_that_is_not_a_view():
    # a view as the root module's output makes FSDP2 warn on every stage and skip its pre-backward
    # hook if anything later modifies it in place
    from megatron_phi4.distributed.vocab_parallel import chunked_head_log_probs

    x, w, targets, upstream = _head_data(n=36)
    x3, t2 = x.reshape(2, -1, x.shape[-1]).requires_grad_(True), targets.reshape(2, -1)
    logp = chunked_head_log_probs(x3, w, t2, chunk_tokens=5)
    assert logp.shape == t2.shape and not logp._is_view()
    (logp * upstream.reshape(2, -1)).sum().backward()
    flat = x.clone().requires_grad_(True)
    (chunked_head_log_probs(flat, w, targets, chunk_tokens=5) * upstream).sum().backward()
    assert torch.equal(x3.grad.reshape(flat.shape), flat.grad)


def _lm_and_dpo_batches(cfg, seq=12):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, cfg.vocab_size, (4, seq + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[:, :3] = -100
    mask = (torch.rand(4, seq, generator=g) > 0.3).float() * (labels >= 0)
    lm = {"input_ids": ids[:, :-1], "labels": labels, "loss_mask": mask,
          "document_ids": (torch.arange(seq) >= 5).long().expand(4, seq)}
    dpo = {"input_ids": ids[:, :-1], "labels": labels, "loss_mask": mask,
           "ref_chosen_logp": torch.tensor([-40.0, -38.0]), "ref_rejected_logp": torch.tensor([-41.0, -36.0]),
           "weight": torch.tensor([1.0, 2.0])}
    return lm, dpo


@pytest.mark.parametrize("loss_fn", [LMLoss(), DPOLoss(beta=0.1)], ids=["lm", "dpo"])
def test_losses_from_the_head_equal_losses_from_whole_logits(loss_fn):
    """The model's head computes log p(labels) in 5-token chunks (forward and backward): the loss
    and every parameter gradient equal those from the whole logits."""
    from megatron_phi4.config import model_preset
    from megatron_phi4.losses import LabelLogProbs, loss_inputs
    from megatron_phi4.models.phi4.model import build_model

    assert loss_inputs(loss_fn) == "label_log_probs"
    model = build_model(model_preset("tiny", logits_chunk_tokens=5), seed=0)
    lm, dpo = _lm_and_dpo_batches(model.config)
    batch = lm if isinstance(loss_fn, LMLoss) else dpo
    results = []
    for chunked in (False, True):
        model.zero_grad()
        kw = dict(document_ids=batch.get("document_ids"))
        if chunked:
            out = loss_fn(LabelLogProbs(model(batch["input_ids"], labels=batch["labels"], **kw)), batch)
        else:
            out = loss_fn(model(batch["input_ids"], **kw), batch)
        out.loss_sum.backward()
        results.append((out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    assert _rel(loss, ref_loss) < 1e-5
    for name, ref in ref_grads.items():
        assert _rel(grads[name], ref) < 1e-5, name


@pytest.mark.gpu
def test_chunked_head_in_bf16_on_cuda_matches_whole_logits():
    from megatron_phi4.distributed.vocab_parallel import chunked_head_log_probs

    x, w, targets, upstream = (t.cuda() for t in _head_data(n=300, hidden=64, vocab=1000))
    x, w = x.bfloat16(), w.bfloat16()
    results = []
    for chunk in (None, 64):
        xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logp = (token_log_probs(xl @ wl.t(), targets) if chunk is None
                else chunked_head_log_probs(xl, wl, targets, chunk_tokens=chunk))
        (logp * upstream).sum().backward()
        results.append((logp.detach(), xl.grad.float(), wl.grad.float()))
    for got, ref in zip(*results):
        assert _rel(got, ref) < 2e-2
