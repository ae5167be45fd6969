"""The layer-backend seam: a backend with other parameter names and fused layouts (the way
Transformer Engine fuses them, tests/layers/fused_backend.py) plugs in without touching the model,
the engine or the checkpoint code.

Checked: the same seed initializes both backends to the same checkpoint tensors; both compute the
same logits; checkpoints cross backends in one process; under TP2 x DP2 (FSDP, sequence parallel)
the fused backend trains like one local process, and its sharded checkpoint (model and AdamW
moments, stored per checkpoint name) loads into a local one-process engine exactly.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.checkpoint.test_sharded import _batches, _full_optim
from tests.distributed_utils import run_distributed
from tests.layers import fused_backend

fused_backend.register()


def _cfg(backend="local"):
    from megatron_phi4.config import model_preset

    return dataclasses.replace(model_preset("tiny"), backend=backend)


def test_fused_backend_has_other_parameters_and_same_checkpoint_names():
    from megatron_phi4.models.phi4.model import build_model

    local, fused = build_model(_cfg(), seed=3), build_model(_cfg("fused_test"), seed=3)
    fused_names = {n for n, _ in fused.named_parameters()}
    assert "layers.0.attention.qkv.weight" in fused_names and "layers.0.mlp.fc1_weight" in fused_names
    assert fused_names.isdisjoint({n for n, _ in local.named_parameters() if ".qkv." in n or ".mlp." in n})
    sd_local, sd_fused = local.state_dict(), fused.state_dict()
    assert list(sd_local) == list(sd_fused)  # same names, same order
    assert all(torch.equal(sd_local[k], sd_fused[k]) for k in sd_local)  # same seed -> same tensors
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fused(tokens), local(tokens), rtol=1e-5, atol=1e-6)


def test_checkpoint_crosses_backends_in_one_process(tmp_path):
    from megatron_phi4.api import load_model
    from megatron_phi4.checkpoint.format import save_model_weights
    from megatron_phi4.models.phi4.model import build_model

    fused = build_model(_cfg("fused_test"), seed=5)
    save_model_weights(fused.state_dict(), tmp_path / "ckpt", _cfg())
    local = load_model(tmp_path / "ckpt")
    tokens = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(local(tokens), fused(tokens), rtol=1e-5, atol=1e-6)
    # and back: the local model's state dict loads into a fused model (fused rows assembled)
    again = build_model(_cfg("fused_test"), seed=0)
    again.load_state_dict(local.state_dict())
    assert torch.equal(again.layers["1"].attention.qkv.weight, fused.layers["1"].attention.qkv.weight)


def _train_fused(rank, world, ckpt):
    from megatron_phi4.checkpoint.sharded import optimizer_shards, save_sharded
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.losses import LMLoss

    pcfg = ParallelConfig(tp=2, sequence_parallel=True)
    dims = ParallelDims.build(pcfg, model_cfg=_cfg())
    engine = ParallelEngine(_cfg("fused_test"), pcfg, dims, seed=9)
    opt = torch.optim.AdamW(engine.parameters(), lr=1e-3, eps=1e-6)
    losses = []
    for step in range(2):
        mbs = _batches(step)
        n = len(mbs) // dims.dp
        mine = mbs[dims.dp_rank * n:(dims.dp_rank + 1) * n]
        opt.zero_grad(set_to_none=True)
        losses.append(engine.forward_backward(mine, LMLoss(), engine.global_units(mine, LMLoss()))["loss"])
        opt.step()
    save_sharded(engine.local_shards(), f"{ckpt}/model")
    save_sharded(optimizer_shards(opt, engine), f"{ckpt}/optim")
    return {"losses": losses, "full": engine.full_state_dict(), "optim": _full_optim(opt, engine)}


def test_fused_backend_under_tp_sp_fsdp_matches_local_and_checkpoints_cross(tmp_path):
    from megatron_phi4.checkpoint.sharded import load_optimizer_shards, load_sharded
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.losses import LMLoss

    got = run_distributed(_train_fused, 4, str(tmp_path), timeout=180)[0]
    # one local process, same seed, same global batches
    engine = ParallelEngine(_cfg(), ParallelConfig(dp_shard="none"), ParallelDims(1, 1, 1), seed=9)
    opt = torch.optim.AdamW(engine.parameters(), lr=1e-3, eps=1e-6)
    for step in range(2):
        mbs = _batches(step)
        opt.zero_grad(set_to_none=True)
        loss = engine.forward_backward(mbs, LMLoss(), engine.global_units(mbs, LMLoss()))["loss"]
        opt.step()
        assert loss == pytest.approx(got["losses"][step], rel=1e-5)
    ref = engine.full_state_dict()
    for k, v in got["full"].items():  # the parity suite's tolerance for parameters after AdamW steps
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5, msg=k)
    # the fused TP2 x DP2 checkpoint (model + AdamW moments by checkpoint name) into a local process
    fresh = ParallelEngine(_cfg(), ParallelConfig(dp_shard="none"), ParallelDims(1, 1, 1), seed=0)
    load_sharded(fresh.local_shards(), tmp_path / "model")
    assert all(torch.equal(fresh.full_state_dict()[k], got["full"][k]) for k in got["full"])
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3, eps=1e-6)
    load_optimizer_shards(opt2, fresh, tmp_path / "optim")
    views = {}
    for name, p in fresh.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            views.update({k: v for k, (v, _) in fresh.shard_views({name: opt2.state[p][key]}, f".{key}").items()})
    assert {k for k in got["optim"] if not k.endswith(".step")} == set(views)
    assert all(torch.equal(views[k], got["optim"][k]) for k in views)
    assert all(float(got["optim"][k]) == 2.0 for k in got["optim"] if k.endswith(".step"))
