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

``chunked_head_log_probs`` fuses the head's matmul into the same computation and runs it a chunk
of tokens at a time, in forward and (recomputing the logits) in backward: the training losses use
it, so neither the ``(tokens, vocab / tp)`` logits nor their fp32 softmax ever exist whole -- at
16K tokens and the 100352 vocabulary one fp32 copy would be 6.6 GB per row. It is written by
hand because no library in this environment offers a fused, chunked, vocabulary-parallel head +
log-prob with a recomputing backward that runs on CPU too (Liger-Kernel's fused linear cross
entropy is Triton-only and takes the whole vocabulary; Megatron's vocab-parallel cross entropy
takes whole logits).
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


# --------------------------------------------------------------------------- head fused, chunked
def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> None:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)


class _ChunkedHeadLogProbs(torch.autograd.Function):
    """log p(target) of ``x @ weight.T`` over the vocabulary, ``chunk`` tokens at a time.

    Forward keeps only what backward needs per token (the log-normalizer, fp32); backward
    recomputes each chunk's logits and turns them into the gradient in place
    (``g * (onehot - softmax)``), then into the chunk's input gradient and its share of the weight
    gradient. At any moment one chunk of logits exists in fp32 (plus, for bf16/fp16 weights, the
    chunk's low-precision matmul output before the cast). Cost: one more head matmul (the
    recomputation) than the unfused path.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_start, group, chunk, out_shape):
        n, local_vocab = x.shape[0], weight.shape[0]
        ignored = targets < 0
        local = targets - vocab_start
        in_range = (local >= 0) & (local < local_vocab) & ~ignored
        local_idx = local.masked_fill(~in_range, 0)
        # allocated in the caller's shape and filled through a flat view, so the output is not itself
        # a view: FSDP2 warns about (and cannot hook in-place ops on) a root module returning a view
        out = torch.empty(out_shape, dtype=torch.float32, device=x.device)
        logp = out.view(-1)
        lse = torch.empty(n, dtype=torch.float32, device=x.device)
        for s, e in _chunks(n, chunk):
            logits = torch.nn.functional.linear(x[s:e], weight).float()  # the one fp32 copy of this chunk
            row_max = logits.max(dim=-1).values
            _all_reduce(row_max, group, dist.ReduceOp.MAX)
            logits.sub_(row_max.unsqueeze(-1))
            target = logits.gather(-1, local_idx[s:e].unsqueeze(-1)).squeeze(-1).masked_fill(~in_range[s:e], 0.0)
            both = torch.stack([logits.exp_().sum(dim=-1), target])
            _all_reduce(both, group)  # one collective for both sums
            log_sum = both[0].log()
            logp[s:e] = both[1] - log_sum
            lse[s:e] = row_max + log_sum
            del logits
        logp.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(x, weight, local_idx, in_range, ignored, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_logp):
        x, weight, local_idx, in_range, ignored, lse = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_logp.reshape(-1).float().masked_fill(ignored, 0.0)
        grad_x = torch.empty_like(x) if need_x else None
        # fp32 weights accumulate in place; lower precision ones in an fp32 accumulator (the
        # unchunked path rounds the whole sum once, so must this one)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s, e in _chunks(x.shape[0], ctx.chunk):
            xc, gc = x[s:e], g[s:e]
            d = torch.nn.functional.linear(xc, weight).float()
            d.sub_(lse[s:e].unsqueeze(-1)).exp_().mul_(-gc.unsqueeze(-1))  # -g * softmax
            d.scatter_add_(-1, local_idx[s:e].unsqueeze(-1), (gc * in_range[s:e]).unsqueeze(-1))  # + g * onehot
            d = d.to(weight.dtype)
            if need_x:
                torch.mm(d, weight, out=grad_x[s:e])
            if need_w:
                if weight.dtype == torch.float32:
                    grad_w.addmm_(d.t(), xc)
                else:  # no mixed-dtype addmm on every device: one low-precision product per chunk
                    grad_w.add_(d.t() @ xc)
            del d
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None, None, None, None, None


def chunked_head_log_probs(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           vocab_start: int = 0, group=None, chunk_tokens: int = 1024) -> torch.Tensor:
    """log p(targets) under ``softmax(x @ weight.T)``, fp32, shape of ``targets``, without ever holding
    the logits of more than ``chunk_tokens`` tokens (forward or backward).

    x: (..., hidden), the head's input as its matmul reads it (already copied / all-gathered for
    tensor parallelism). weight: (local vocab, hidden), this rank's rows ``[vocab_start,
    vocab_start + local vocab)`` of the head. group: the tensor-parallel group the vocabulary is
    split over (None: the whole vocabulary is here). Targets < 0 give 0 and no gradient. Values and
    gradients (w.r.t. ``x`` and ``weight``; under TP the ``x`` gradient is this rank's partial sum,
    reduced by the input's ``copy_to_tp`` / ``gather_from_sp``) equal ``log_softmax(x @ weight.T)``
    gathered at the targets, to fp32 rounding.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: must be >= 1, got {chunk_tokens}")
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    shape = targets.shape
    flat_x = x.reshape(-1, x.shape[-1])
    flat_t = targets.reshape(-1).to(flat_x.device)
    if flat_x.shape[0] != flat_t.shape[0]:
        raise ValueError(f"chunked_head_log_probs: {flat_x.shape[0]} hidden states but {flat_t.shape[0]} targets")
    return _ChunkedHeadLogProbs.apply(flat_x, weight, flat_t, int(vocab_start), group, int(chunk_tokens), shape)
