"""Vocabulary-parallel log-probabilities and cross entropy.

The LM head is column-parallel without an output gather, so each TP rank holds logits for a
contiguous slice of the vocabulary, ``(batch, seq, vocab / tp)``. Gathering the full logits would
cost ``batch*seq*100352`` floats per rank; instead three small all-reduces over the TP group
(each of size ``batch*seq``) give exact values:

1. max over the vocabulary (all-reduce MAX) for a stable softmax,
2. sum of exp(logit - max) (all-reduce SUM),
3. the target's logit, contributed by the one rank whose slice holds it (all-reduce SUM).

``log p(target) = logit_target - max - log(sum_exp)``. The backward needs no communication:
``d logp / d logits_local = onehot_local(target) - softmax_local`` with the global normalizer kept
from the forward. Targets < 0 (ignore index) give log-prob 0 and zero gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _vocab_range(local_vocab: int, group) -> tuple[int, int]:
    start = dist.get_rank(group) * local_vocab
    return start, start + local_vocab


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group):
        logits = logits.float()
        local_vocab = logits.shape[-1]
        start, end = _vocab_range(local_vocab, group)

        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        ignored = targets < 0
        in_range = (targets >= start) & (targets < end) & ~ignored
        local_idx = (targets - start).masked_fill(~in_range, 0)
        target_logit = shifted.gather(-1, local_idx.unsqueeze(-1)).squeeze(-1).masked_fill(~in_range, 0.0)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        # One all-reduce for the two sums (halves the latency of the second step).
        both = torch.stack([sum_exp, target_logit])
        dist.all_reduce(both, group=group)
        sum_exp, target_logit = both[0], both[1]

        logp = (target_logit - sum_exp.log()).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_idx, in_range, ignored)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        softmax, local_idx, in_range, ignored = ctx.saved_tensors
        g = grad_logp.float().masked_fill(ignored, 0.0).unsqueeze(-1)
        grad = -softmax * g
        grad.scatter_add_(-1, local_idx.unsqueeze(-1), (in_range.unsqueeze(-1).float() * g))
        return grad, None, None


def vocab_parallel_log_probs(logits_shard: torch.Tensor, targets: torch.Tensor, group) -> torch.Tensor:
    """log p(targets) in fp32, shape of ``targets``; ``logits_shard`` is this rank's vocabulary slice
    (rank r holds ids ``[r*V/tp, (r+1)*V/tp)``). Values and gradients equal the unsharded
    ``log_softmax(logits).gather(targets)``; targets < 0 give 0."""
    return _VocabParallelLogProbs.apply(logits_shard, targets, group)


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, targets: torch.Tensor, group,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross entropy (no reduction); ignored tokens give 0."""
    targets = targets.masked_fill(targets == ignore_index, -1)
    return -vocab_parallel_log_probs(logits_shard, targets, group)
