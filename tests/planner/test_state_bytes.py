"""The planner's parameter, gradient and optimizer bytes equal what the trainer allocates, exactly.

Each layout builds a real ``ParallelEngine`` on forked gloo ranks, runs one training step with the
trainer's optimizer (``build_optimizer``: torch AdamW in two parameter groups), and counts the bytes
of the storages behind this rank's local parameters, their gradients and every optimizer-state
tensor (each storage once: FSDP keeps a unit's gradients in one flat buffer). The planner's
``state_bytes`` for that (pipeline rank, DP rank) must match to the byte.
"""
from __future__ import annotations

import pytest

from tests.distributed_utils import run_distributed


def _storage_bytes(tensors) -> int:
    from megatron_phi4.distributed.sharding import local_tensor

    seen, total = set(), 0
    for t in tensors:
        s = local_tensor(t).untyped_storage()
        if s.data_ptr() not in seen or s.nbytes() == 0:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def _measure(rank, world, layout_kwargs, model_kwargs):
    import torch

    from megatron_phi4.config import OptimizerConfig, ParallelConfig, model_preset
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.losses import LMLoss
    from megatron_phi4.training.optimizer import build_optimizer
    from tests.parallel._parity import make_lm_microbatches

    cfg = model_preset("tiny", **model_kwargs)
    pcfg = ParallelConfig(**layout_kwargs)
    dims = ParallelDims.build(pcfg, model_cfg=cfg)
    engine = ParallelEngine(cfg, pcfg, dims, seed=0)
    optimizer = build_optimizer(engine, OptimizerConfig())
    mbs = make_lm_microbatches(4 * dims.dp, seq=16, seed=3)
    mine = mbs[dims.dp_rank * 4:(dims.dp_rank + 1) * 4]
    loss_fn = LMLoss()
    engine.forward_backward(mine, loss_fn, engine.global_units(mine, loss_fn))
    optimizer.step()
    params = [p for _, p in engine.named_parameters()]
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"pp_rank": dims.pp_rank, "dp_rank": dims.dp_rank, "tp_rank": dims.tp_rank,
            "parameters": _storage_bytes(params), "gradients": _storage_bytes([p.grad for p in params]),
            "optimizer": _storage_bytes(state), "n_state": len(state), "n_params": len(params)}


LAYOUTS = {
    # name: (ParallelConfig kwargs, world size, model overrides)
    "tp2-pp2-dp2-fsdp": (dict(tp=2, pp=2, sequence_parallel=True), 8, dict(num_layers=4)),
    "tp2-pp2-dp2-replicated": (dict(tp=2, pp=2, dp_shard="none"), 8, dict(num_layers=4)),
    # dp 3: uneven FSDP rows (vocab 512, hidden 64, kv 32 ... over 3 ranks), padded shards
    "dp3-fsdp-uneven": (dict(), 3, dict(num_layers=2)),
    # interleaved pipeline with a head cost: uneven stage split, two chunks per rank, FSDP dp 2
    "pp2x2-interleaved-dp2": (dict(pp=2, pp_schedule="interleaved_1f1b", virtual_stages=2, pp_head_cost=1.5), 4,
                              dict(num_layers=5)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_state_bytes_match_the_trainer(name):
    from megatron_phi4.config import model_preset
    from megatron_phi4.planner.layout import Layout
    from megatron_phi4.planner.memory import state_bytes

    kwargs, world, model_kwargs = LAYOUTS[name]
    results = run_distributed(_measure, world, kwargs, model_kwargs, timeout=300)
    cfg = model_preset("tiny", **model_kwargs)
    tp, pp = kwargs.get("tp", 1), kwargs.get("pp", 1)
    layout = Layout(tp, pp, world // (tp * pp), sequence_parallel=kwargs.get("sequence_parallel", False),
                    pp_schedule=kwargs.get("pp_schedule", "1f1b"), virtual_stages=kwargs.get("virtual_stages", 1),
                    dp_shard=kwargs.get("dp_shard", "fsdp"), pp_head_cost=kwargs.get("pp_head_cost", 0.0),
                    precision="fp32")
    seen_different = set()
    for r in results:
        predicted = state_bytes(cfg, layout, r["pp_rank"], r["dp_rank"])
        measured = (r["parameters"], r["gradients"], r["optimizer"])
        assert (predicted.parameters, predicted.gradients, predicted.optimizer) == measured, (
            f"{name} rank pp{r['pp_rank']} dp{r['dp_rank']} tp{r['tp_rank']}: predicted {predicted}, measured "
            f"parameters/gradients/optimizer {measured}")
        seen_different.add(measured)
    # the layouts are chosen so that ranks differ (stages, uneven shards): the test compares more than one number
    assert len(seen_different) > 1, name
