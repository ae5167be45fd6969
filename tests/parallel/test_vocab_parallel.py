"""Vocabulary-parallel log-probs / cross entropy == the unsharded computation (values and grads)."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed_utils import run_distributed

V, B, S = 48, 2, 5


def _data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, S, V, generator=g) * 3
    targets = torch.randint(0, V, (B, S), generator=g)
    targets[0, 1] = -100  # ignored
    targets[1, 4] = -1
    upstream = torch.randn(B, S, generator=g)
    return logits, targets, upstream


def _reference():
    logits, targets, upstream = _data()
    logits.requires_grad_(True)
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(targets < 0, 0.0)
    (logp * upstream).sum().backward()
    ce = F.cross_entropy(logits.detach().reshape(-1, V), targets.masked_fill(targets == -1, -100).reshape(-1),
                         reduction="none", ignore_index=-100).reshape(B, S)
    return logp.detach(), logits.grad, ce


def _sharded(rank, world):
    from megatron_phi4.distributed.vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_log_probs
    from megatron_phi4.losses import LMLoss

    logits, targets, upstream = _data()
    shard = logits.chunk(world, dim=-1)[rank].clone().requires_grad_(True)
    group = dist.group.WORLD
    logp = vocab_parallel_log_probs(shard, targets, group)
    (logp * upstream).sum().backward()
    ce = vocab_parallel_cross_entropy(shard.detach(), targets.masked_fill(targets == -1, -100), group)
    # Through the loss object (dispatch in losses.token_log_probs)
    batch = {"labels": targets, "loss_mask": torch.ones(B, S)}
    lm = LMLoss()(shard.detach(), batch, tp_group=group)
    return logp.detach(), shard.grad, ce, float(lm.loss_sum)


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_log_probs_and_grads(world):
    ref_logp, ref_grad, ref_ce = _reference()
    results = run_distributed(_sharded, world)
    logits, targets, _ = _data()
    ref_lm = float(LMLoss_ref(logits, targets))
    for rank, (logp, grad, ce, lm) in enumerate(results):
        torch.testing.assert_close(logp, ref_logp, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad.chunk(world, dim=-1)[rank], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ce, ref_ce, rtol=1e-6, atol=1e-6)
        assert lm == pytest.approx(ref_lm, rel=1e-6)


def LMLoss_ref(logits, targets):
    from megatron_phi4.losses import LMLoss

    return LMLoss()(logits, {"labels": targets, "loss_mask": torch.ones(B, S)}).loss_sum


# ------------------------------------------------------------------ the head fused and chunked, under TP
N, H, VH = 23, 8, 64  # tokens, hidden, vocabulary of the head tests


def _head_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, H, generator=g)
    w = torch.randn(VH, H, generator=g) * 0.5
    targets = torch.randint(0, VH, (N,), generator=g)
    targets[[2, 9]] = -100
    return x, w, targets, torch.randn(N, generator=g)


def _head_sharded(rank, world, chunk):
    from megatron_phi4.distributed.tensor_parallel import copy_to_tp
    from megatron_phi4.distributed.vocab_parallel import chunked_head_log_probs

    x, w, targets, upstream = _head_data()
    x.requires_grad_(True)
    local = VH // world
    shard = w[rank * local:(rank + 1) * local].clone().requires_grad_(True)
    group = dist.group.WORLD
    logp = chunked_head_log_probs(copy_to_tp(x, group), shard, targets, vocab_start=rank * local, group=group,
                                  chunk_tokens=chunk)
    (logp * upstream).sum().backward()  # copy_to_tp's backward sums the input gradient over the ranks
    return logp.detach(), x.grad, shard.grad


@pytest.mark.parametrize("chunk", [4, 100])
def test_chunked_head_under_tp2_equals_unsharded_whole_logits(chunk):
    x, w, targets, upstream = _head_data()
    x.requires_grad_(True), w.requires_grad_(True)
    logp = torch.log_softmax(x @ w.t(), -1).gather(-1, targets.clamp(min=0)[:, None])[:, 0].masked_fill(targets < 0, 0)
    (logp * upstream).sum().backward()
    for rank, (got, gx, gw) in enumerate(run_distributed(_head_sharded, 2, chunk)):
        torch.testing.assert_close(got, logp.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw, w.grad.chunk(2)[rank], rtol=1e-5, atol=1e-6)
