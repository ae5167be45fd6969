"""Sharded (distributed) checkpoints: save under one layout, load under others, bit for bit.

One 8-rank source run (TP2 x PP2 x DP2, FSDP) trains two AdamW steps, saves model + optimizer with
``save_sharded`` (and the model once more with ``async_=True``), then takes a third step without any
restart. Engines at other layouts (and one process) load that checkpoint and must reproduce the saved
parameters and optimizer state exactly, and the third step within 1e-6.
"""
from __future__ import annotations

import pytest
import torch

from megatron_phi4.checkpoint.format import CheckpointError
from tests.distributed_utils import DistributedTestError, run_distributed

SEQ = 16
N_MB = 4  # micro-batches per global batch
LR = 1e-3


def _cfg():
    from megatron_phi4.config import model_preset

    return model_preset("tiny")  # 2 layers, hidden 64, vocab 512


def _batches(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(N_MB):
        ids = torch.randint(0, _cfg().vocab_size, (1, SEQ + 1), generator=g)
        out.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                    "loss_mask": (torch.rand(1, SEQ, generator=g) > 0.2).float()})
    return out


def _build(layout: dict, seed: int):
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.distributed.parallel_dims import ParallelDims

    pcfg = ParallelConfig(**layout)
    dims = ParallelDims.build(pcfg, model_cfg=_cfg())
    engine = ParallelEngine(_cfg(), pcfg, dims, seed=seed)
    named = list(engine.named_parameters())
    groups = [{"params": [p for n, p in named if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, eps=1e-6)
    return engine, dims, opt


def _train_step(engine, dims, opt, step: int):
    from megatron_phi4.losses import LMLoss

    mbs = _batches(step)
    n = N_MB // dims.dp
    mine = mbs[dims.dp_rank * n:(dims.dp_rank + 1) * n]
    loss_fn = LMLoss()
    opt.zero_grad(set_to_none=True)
    engine.forward_backward(mine, loss_fn, engine.global_units(mine, loss_fn))
    opt.step()


def _full_optim(opt, engine) -> dict[str, torch.Tensor]:
    """Assemble the full optimizer state from every rank's shards (independent of DCP)."""
    import torch.distributed as dist

    from megatron_phi4.checkpoint.sharded import optimizer_shards

    mine = {k: (t.cpu().clone(), info) for k, (t, info) in optimizer_shards(opt, engine).items()
            if not info.replicated}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    full: dict[str, torch.Tensor] = {}
    for shards in gathered:
        for k, (t, info) in shards.items():
            full.setdefault(k, torch.full(info.global_shape, float("nan"), dtype=t.dtype))
            full[k][tuple(slice(o, o + n) for o, n in zip(info.global_offset, t.shape))] = t
    return full


def _source(rank, world, ckpt):
    import torch.distributed as dist

    from megatron_phi4.checkpoint.format import write_meta
    from megatron_phi4.checkpoint.sharded import optimizer_shards, save_sharded

    engine, dims, opt = _build(dict(tp=2, pp=2), seed=0)
    for step in range(2):
        _train_step(engine, dims, opt, step)
    save_sharded(engine.local_shards(), f"{ckpt}/model")
    save_sharded(optimizer_shards(opt, engine), f"{ckpt}/optim")
    fut = save_sharded(engine.local_shards(), f"{ckpt}-async/model", async_=True)
    fut.result()
    if rank == 0:
        write_meta(ckpt, _cfg(), kind="train", step=2)
        write_meta(f"{ckpt}-async", _cfg(), kind="train", step=2)
    dist.barrier()
    out = {"full": engine.full_state_dict(), "optim": _full_optim(opt, engine)}
    _train_step(engine, dims, opt, 2)
    out["continued"] = engine.full_state_dict()
    return out if rank == 0 else None


def _restore(rank, world, layout, ckpt):
    from megatron_phi4.checkpoint.sharded import load_optimizer_shards, load_sharded

    engine, dims, opt = _build(layout, seed=7)  # different init: everything must come from the checkpoint
    load_sharded(engine.local_shards(), f"{ckpt}/model")
    load_optimizer_shards(opt, engine, f"{ckpt}/optim")
    out = {"full": engine.full_state_dict(), "optim": _full_optim(opt, engine)}
    _train_step(engine, dims, opt, 2)
    out["continued"] = engine.full_state_dict()
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("sharded") / "ckpt"
    ref = run_distributed(_source, 8, str(ckpt), timeout=120)[0]
    return ckpt, ref


def _assert_equal(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def test_save_tp2_pp2_dp2_reads_in_one_process(source):
    from megatron_phi4 import load_model
    from megatron_phi4.checkpoint.format import load_model_weights
    from megatron_phi4.checkpoint.sharded import load_sharded
    from megatron_phi4.distributed.sharding import ShardInfo

    ckpt, ref = source
    _assert_equal(load_model_weights(ckpt), ref["full"])
    _assert_equal(load_model_weights(f"{ckpt}-async"), ref["full"])  # the async save wrote the same
    _assert_equal(dict(load_model(ckpt).state_dict()), ref["full"])
    # every rank wrote its own file; the optimizer state reads back in one process too
    assert len(list((ckpt / "model").glob("*.distcp"))) == 8
    optim = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in ref["optim"].items()}
    load_sharded({k: (t, ShardInfo(tuple(t.shape), (0,) * t.dim(), False)) for k, t in optim.items()},
                 ckpt / "optim")
    _assert_equal(optim, ref["optim"])
    assert {k.rsplit(".", 1)[1] for k in optim} == {"exp_avg", "exp_avg_sq", "step"}
    assert all(float(v) == 2.0 for k, v in optim.items() if k.endswith(".step"))


@pytest.mark.parametrize("layout,world", [(dict(tp=1, pp=2), 2), (dict(tp=2, pp=1), 4), (dict(), 1)],
                         ids=["tp1-pp2-dp1", "tp2-pp1-dp2", "one-process"])
def test_reshard_load_and_continue(source, layout, world):
    ckpt, ref = source
    got = run_distributed(_restore, world, layout, str(ckpt), timeout=120)[0]
    _assert_equal(got["full"], ref["full"])
    _assert_equal(got["optim"], ref["optim"])
    for k, want in ref["continued"].items():
        assert not torch.equal(want, ref["full"][k]), k  # the third step moved it
        torch.testing.assert_close(got["continued"][k], want, rtol=0, atol=1e-6, msg=k)


def _from_single_process(rank, world, ckpt):
    import dataclasses

    from megatron_phi4.checkpoint.sharded import load_sharded

    engine, dims, _ = _build(dict(tp=2), seed=7)  # dp=2 FSDP
    load_sharded(engine.local_shards(), f"{ckpt}/model")
    out = {"full": engine.full_state_dict(), "errors": []}
    shards = engine.local_shards()
    # A key only rank 0 asks for: every rank must fail (DCP gathers the plans), none may hang.
    bad = dict(shards)
    if rank == 0:
        bad["layers.9.mlp.bogus.weight"] = shards["norm.weight"]
    # A wrong global shape on every rank.
    name = "layers.0.mlp.down_proj.weight"
    t, info = shards[name]
    wrong = dict(shards)
    wrong[name] = (t, dataclasses.replace(info, global_shape=(info.global_shape[0], info.global_shape[1] * 2)))
    for targets in (bad, wrong):
        try:
            load_sharded(targets, f"{ckpt}/model")
            out["errors"].append(None)
        except CheckpointError as e:
            out["errors"].append(str(e))
    return out


def test_single_process_checkpoint_into_tp2_dp2_and_errors(tmp_path):
    from megatron_phi4.checkpoint.format import save_model_weights
    from megatron_phi4.models.phi4.model import build_model

    sd = build_model(_cfg(), "cpu", 3).state_dict()
    save_model_weights(sd, tmp_path / "ckpt", _cfg())
    results = run_distributed(_from_single_process, 4, str(tmp_path / "ckpt"), timeout=120)
    _assert_equal(results[0]["full"], sd)
    for r in results:
        missing, shape = r["errors"]
        assert missing is not None and "layers.9.mlp.bogus.weight" in missing and "missing" in missing
        assert str(tmp_path / "ckpt" / "model") in missing
        assert shape is not None and "layers.0.mlp.down_proj.weight" in shape
        assert "(64, 128)" in shape and "(64, 256)" in shape and str(tmp_path / "ckpt" / "model") in shape


def test_errors_single_process(tmp_path):
    from megatron_phi4.checkpoint.sharded import load_sharded, save_sharded
    from megatron_phi4.distributed.sharding import ShardInfo

    a = torch.randn(6, 4)
    save_sharded({"a": (a, ShardInfo((6, 4), (0, 0), False))}, tmp_path / "m")
    t = torch.zeros(2, 3)
    load_sharded({"a": (t, ShardInfo((6, 4), (2, 1), True))}, tmp_path / "m")  # an interior rectangle
    assert torch.equal(t, a[2:4, 1:4])
    with pytest.raises(CheckpointError, match=r"missing key.*'b'"):
        load_sharded({"b": (t, ShardInfo((6, 4), (0, 0), False))}, tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"a: checkpoint has global shape \(6, 4\), the model expects \(7, 4\)"):
        load_sharded({"a": (t, ShardInfo((7, 4), (0, 0), False))}, tmp_path / "m")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_sharded({"a": (t, ShardInfo((6, 4), (5, 0), False))}, tmp_path / "m")
    with pytest.raises(CheckpointError, match=".metadata not found"):
        load_sharded({"a": (t, ShardInfo((6, 4), (0, 0), False))}, tmp_path / "nothing")


def _bad_tiling(rank, world, path, rects):
    from megatron_phi4.checkpoint.sharded import save_sharded
    from megatron_phi4.distributed.sharding import ShardInfo

    start, stop = rects[rank]
    save_sharded({"a": (torch.ones(stop - start), ShardInfo((4,), (start,), False))}, path)


@pytest.mark.parametrize("rects,match", [([(0, 3), (1, 4)], "overlapping chunks"),
                                         ([(0, 1), (2, 4)], "invalid fill")], ids=["overlap", "gap"])
def test_bad_tiling_rejected(tmp_path, rects, match):
    # Non-replicated rectangles must tile the global tensor exactly: DCP's global plan check refuses
    # overlaps and gaps on every rank (nothing is written).
    with pytest.raises(DistributedTestError, match=match):
        run_distributed(_bad_tiling, 2, str(tmp_path / "m"), rects, timeout=60)
    assert not (tmp_path / "m" / ".metadata").exists()
