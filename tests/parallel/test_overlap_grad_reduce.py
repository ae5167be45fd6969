"""Replicated DP (``dp_shard: none``): the gradient all-reduce overlapped with backward.

Same gradients as the one bucketed all-reduce after backward (``overlap_grad_reduce: false``) under
DP=2 with gradient accumulation, only the last micro-batch's backward reduces, and the first bucket
is launched while that backward is still producing gradients."""
import torch
import torch.distributed as dist

from tests.distributed_utils import run_distributed
from tests.parallel._parity import make_lm_microbatches, tiny_cfg

N_MB = 3
BUCKET_BYTES = 16 << 10  # small buckets: the tiny model spreads over several


def _step(rank, overlap: bool, events: list | None = None):
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.losses import LMLoss

    pcfg = ParallelConfig(dp_shard="none", overlap_grad_reduce=overlap)
    dims = ParallelDims.build(pcfg, model_cfg=tiny_cfg())
    engine = ParallelEngine(tiny_cfg(), pcfg, dims, seed=0, grad_bucket_bytes=BUCKET_BYTES)
    mbs = make_lm_microbatches(N_MB, seed=10 + rank)  # different data per rank: the sum matters
    loss_fn = LMLoss()
    units = engine.global_units(mbs, loss_fn)
    original = dist.all_reduce
    if events is not None:
        for name, p in engine.named_parameters():  # registered after the reducer's hooks: run after them
            p.register_post_accumulate_grad_hook(lambda p, name=name: events.append(("grad", name)))

        def logging_all_reduce(tensor, *args, **kwargs):
            events.append(("launch", bool(kwargs.get("async_op"))))
            return original(tensor, *args, **kwargs)

        dist.all_reduce = logging_all_reduce
    try:
        engine.forward_backward(mbs, loss_fn, units)
    finally:
        dist.all_reduce = original
    grads = {n: p.grad.detach().clone() for n, p in engine.named_parameters()}
    buckets = len(engine._grad_reducer.buckets) if engine._grad_reducer is not None else 0
    return grads, buckets, len(list(engine.parameters()))


def _compare(rank, world):
    events: list = []
    overlapped, buckets, n_params = _step(rank, True, events)
    plain, no_reducer, _ = _step(rank, False)
    return overlapped, plain, buckets, no_reducer, n_params, events


def test_overlapped_reduce_equals_reduce_after_backward_and_overlaps():
    results = run_distributed(_compare, 2)
    for overlapped, plain, buckets, no_reducer, n_params, events in results:
        assert no_reducer == 0 and buckets >= 3
        # Same sums: gloo adds the two ranks' fp32 values in the same way whatever the bucket layout.
        assert overlapped.keys() == plain.keys()
        for name in plain:
            torch.testing.assert_close(overlapped[name], plain[name], rtol=0, atol=0, msg=name)
        # Reduced, not local: the two ranks hold the same (summed) gradients.
        torch.testing.assert_close(results[0][0][next(iter(plain))], results[1][0][next(iter(plain))], rtol=0, atol=0)

        launches = [i for i, e in enumerate(events) if e[0] == "launch" and e[1]]
        grads = [i for i, e in enumerate(events) if e[0] == "grad"]
        assert len(grads) == N_MB * n_params
        # One async all-reduce per bucket, all in the last micro-batch's backward ...
        assert len(launches) == buckets
        assert launches[0] > grads[(N_MB - 1) * n_params - 1]
        # ... and the first one launched while that backward was still finishing gradients.
        assert launches[0] < grads[-1]
        assert sum(1 for g in grads if g > launches[0]) >= n_params // 4
