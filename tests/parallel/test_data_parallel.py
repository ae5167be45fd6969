"""FSDP2 gradient accumulation: one reduce-scatter per FSDP unit per step (on the last micro-batch),
or one per micro-batch when asked; parameters and optimizer state are sharded over DP."""
import pytest
import torch.distributed as dist

from tests.distributed_utils import run_distributed
from tests.parallel._parity import make_lm_microbatches, tiny_cfg


def _count_reduce_scatters(rank, world, every):
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.losses import LMLoss

    pcfg = ParallelConfig()
    dims = ParallelDims.build(pcfg, model_cfg=tiny_cfg())
    engine = ParallelEngine(tiny_cfg(), pcfg, dims, seed=0, sync_grads_every_microbatch=every)
    mbs = make_lm_microbatches(4, seed=rank)
    calls = []
    originals = {name: getattr(dist, name) for name in ("reduce_scatter_single", "reduce_scatter_tensor")}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)
        return wrapper

    for name in originals:
        setattr(dist, name, counting(name))
    try:
        loss_fn = LMLoss()
        engine.forward_backward(mbs, loss_fn, engine.global_units(mbs, loss_fn))
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    local = sum(p.to_local().numel() for p in engine.parameters())
    total = sum(p.numel() for p in engine.parameters())  # DTensor numel = global
    return len(calls), local, total


@pytest.mark.parametrize("every", [False, True], ids=["sync-last", "sync-every"])
def test_reduce_scatter_once_per_step(every):
    units = tiny_cfg().num_layers + 1  # one FSDP unit per block + the root
    for n_calls, local, total in run_distributed(_count_reduce_scatters, 2, every):
        assert n_calls == units * (4 if every else 1)
        assert local * 2 == total  # ZeRO-3: each DP rank holds half of every parameter


def _step_warnings(rank, world):
    import warnings

    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.losses import LMLoss

    pcfg = ParallelConfig()
    engine = ParallelEngine(tiny_cfg(), pcfg, ParallelDims.build(pcfg, model_cfg=tiny_cfg()), seed=0)
    mbs = make_lm_microbatches(2, seed=rank)
    loss_fn = LMLoss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.forward_backward(mbs, loss_fn, engine.global_units(mbs, loss_fn))
    return [str(w.message) for w in caught]


def test_fsdp_root_output_is_not_a_view():
    # FSDP2 warns (every stage of every run) when the root module returns a view, because it cannot
    # hook in-place ops on it; the head's log-prob output must be a tensor of its own
    for messages in run_distributed(_step_warnings, 2):
        assert not [m for m in messages if "view tensor" in m], messages
