"""The norm used for clipping is the single-process norm: TP-replicated RMSNorm weights (whose
gradients every TP rank holds) are counted once, FSDP shards and pipeline stages all count."""
import math

import pytest
import torch
import torch.distributed as dist

from tests.distributed_utils import run_distributed
from tests.parallel._parity import make_lm_microbatches, tiny_cfg


def _reference_norm(mbs):
    from megatron_phi4.losses import LMLoss
    from megatron_phi4.models.phi4.model import build_model

    model, loss_fn = build_model(tiny_cfg(), "cpu", 0), LMLoss()
    units = sum(float(loss_fn.units(mb)) for mb in mbs)
    for mb in mbs:
        (loss_fn(model(mb["input_ids"]), mb).loss_sum / units).backward()
    norms = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))), norms


def _parallel_norm(rank, world, layout, mbs):
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.losses import LMLoss

    pcfg = ParallelConfig(**layout)
    dims = ParallelDims.build(pcfg, model_cfg=tiny_cfg())
    engine = ParallelEngine(tiny_cfg(), pcfg, dims, seed=0)
    n = len(mbs) // dims.dp
    mine = mbs[dims.dp_rank * n:(dims.dp_rank + 1) * n]
    loss_fn = LMLoss()
    engine.forward_backward(mine, loss_fn, engine.global_units(mine, loss_fn))
    # What a naive implementation would get: every local gradient counted on every rank.
    naive = torch.zeros((), dtype=torch.float64)
    for p in engine.parameters():
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        naive += g.double().pow(2).sum()
    dist.all_reduce(naive)
    norm = engine.clip_grad_norm_(1e-3)  # clips hard; returns the norm before clipping
    after = engine.clip_grad_norm_(0.0)  # 0: only measure
    return norm, math.sqrt(float(naive)), after


@pytest.mark.parametrize("layout,world", [(dict(tp=2, sequence_parallel=True), 4), (dict(tp=2, pp=2), 4)],
                         ids=["tp2-sp-dp2-fsdp", "tp2-pp2"])
def test_grad_norm_equals_single_process(layout, world):
    mbs = make_lm_microbatches(4, seed=3)
    ref, per_param = _reference_norm(mbs)
    norm_sq_of_norms = sum(v * v for k, v in per_param.items() if k.endswith("norm.weight"))
    for norm, naive, after in run_distributed(_parallel_norm, world, layout, mbs):
        assert norm == pytest.approx(ref, rel=1e-6)
        assert after == pytest.approx(1e-3, rel=1e-4)  # clipped to max_norm
        if layout.get("pp", 1) == 1:
            # The naive count double-counts the replicated norm weights (TP=2) and measurably differs.
            assert naive == pytest.approx(math.sqrt(ref ** 2 + norm_sq_of_norms), rel=1e-6)
            assert abs(naive - ref) / ref > 2e-5  # 20x the tolerance used above
