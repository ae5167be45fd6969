"""Precomputed DPO reference log-probs (tools/precompute_ref_logprobs.py): the same values under
any layout, resumable, and the same losses as a frozen reference model during training; a sidecar
from another model is refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed_utils import DistributedTestError, run_distributed
from tests.training.helpers import losses, synthetic_recipe, train, write_recipe

SEQ = 16


def _pairs(path: Path, n: int, seed: int = 0) -> str:
    """Random pairs over the tiny vocabulary, each row exactly SEQ + 1 tokens (no padding)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            p = int(rng.integers(2, SEQ - 2))
            f.write(json.dumps({"prompt_ids": rng.integers(0, 512, p).tolist(),
                                "chosen_ids": rng.integers(0, 512, SEQ + 1 - p).tolist(),
                                "rejected_ids": rng.integers(0, 512, SEQ + 1 - p).tolist()}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    tree = synthetic_recipe(d / "run", pre_steps=2, mid_steps=1, interval=0)
    tree["stages"] = tree["stages"][:1]
    train(write_recipe(d / "pre.yaml", tree))
    return d / "run" / "checkpoints" / "pretrain" / "step_0000002"


def _precompute(rank, world, ckpt, data, tp, pairs_per_block, max_blocks):
    from megatron_phi4.checkpoint.format import model_config_from_meta, read_meta
    from megatron_phi4.checkpoint.manager import load_model_weights_into
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.distributed import init_distributed
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.posttrain.ref_logprobs import precompute_ref_logprobs

    cfg = model_config_from_meta(read_meta(ckpt))
    pcfg = ParallelConfig(tp=tp, dp_shard="none")
    dims = init_distributed(pcfg, cfg)
    engine = ParallelEngine(cfg, pcfg, dims)
    load_model_weights_into(ckpt, engine)
    return precompute_ref_logprobs(ckpt, data, seq_length=SEQ, engine=engine, micro_batch_size=2,
                                   pairs_per_block=pairs_per_block, max_blocks=max_blocks, log=lambda m: None)


def _values(data: str):
    from megatron_phi4.data.preference import read_ref_logps

    chosen, rejected, meta = read_ref_logps(data)
    return np.stack([chosen, rejected], 1), meta


def test_same_values_under_any_layout_and_after_an_interruption(tmp_path, pretrained):
    data = _pairs(tmp_path / "pairs.jsonl", 21)
    run_distributed(_precompute, 1, str(pretrained), [data], 1, 4, None)
    one, meta = _values(data)
    assert one.shape == (21, 2) and meta["seq_length"] == SEQ and meta["pairs"] == 21
    assert np.all(one < 0)
    for world, tp in ((2, 2), (2, 1)):  # TP2; DP2 (blocks dealt to two replicas)
        Path(data + ".ref_logps.npz").unlink()
        run_distributed(_precompute, world, str(pretrained), [data], tp, 4, None)
        np.testing.assert_allclose(_values(data)[0], one, rtol=1e-5, err_msg=f"world {world} tp {tp}")
    # interrupted after 2 blocks (of 6): no sidecar yet, the finished blocks are kept and reused
    Path(data + ".ref_logps.npz").unlink()
    assert run_distributed(_precompute, 1, str(pretrained), [data], 1, 4, 2)[0] == []
    parts = list(Path(tmp_path).glob("pairs.jsonl.ref_logps.parts-*/block_*.npy"))
    assert len(parts) == 2 and not Path(data + ".ref_logps.npz").exists()
    run_distributed(_precompute, 1, str(pretrained), [data], 1, 4, None)
    np.testing.assert_array_equal(_values(data)[0], one)
    assert not list(Path(tmp_path).glob("pairs.jsonl.ref_logps.parts-*"))


def _dpo_recipe(tmp_path, run, data, init, reference):
    tree = synthetic_recipe(tmp_path / run, pre_steps=1, mid_steps=1, interval=0)
    tree["stages"] = [{"name": "dpo", "train_steps": 3, "init_from": str(init),
                       "loss": {"type": "dpo", "dpo_beta": 0.1, "dpo_reference": reference},
                       "data": {"kind": "preference", "paths": [data], "seq_length": SEQ, "micro_batch_size": 2,
                                "global_batch_size": 4},
                       "optim": {"lr": 1e-3, "min_lr": 1e-4}}]
    return write_recipe(tmp_path / f"{run}.yaml", tree)


def test_precomputed_and_frozen_reference_give_the_same_losses(tmp_path, pretrained):
    data = _pairs(tmp_path / "pairs.jsonl", 12, seed=1)
    train(_dpo_recipe(tmp_path, "frozen", data, pretrained, "model"))
    run_distributed(_precompute, 2, str(pretrained), [data], 2, 4, None)  # computed at TP2
    train(_dpo_recipe(tmp_path, "pre", data, pretrained, "precomputed"))
    frozen, pre = losses(tmp_path / "frozen"), losses(tmp_path / "pre")
    assert set(frozen) == set(pre) == {("dpo", 1), ("dpo", 2), ("dpo", 3)}
    for k in frozen:
        assert pre[k] == pytest.approx(frozen[k], rel=1e-5), k
    assert frozen[("dpo", 1)] == pytest.approx(np.log(2), rel=1e-6)  # policy == reference at the start


def test_a_sidecar_from_another_model_is_refused(tmp_path, pretrained):
    data = _pairs(tmp_path / "pairs.jsonl", 8, seed=2)
    run_distributed(_precompute, 1, str(pretrained), [data], 1, 4, None)
    other = tmp_path / "other"  # a different reference: the seed-initialized weights of another run
    tree = synthetic_recipe(other, pre_steps=1, mid_steps=1, interval=0)
    tree["stages"] = tree["stages"][:1]
    train(write_recipe(tmp_path / "other.yaml", tree))
    with pytest.raises(DistributedTestError, match=r"ref_logps.npz: computed with model .* recompute them"):
        train(_dpo_recipe(tmp_path, "bad", data, other / "checkpoints" / "pretrain" / "step_0000001",
                          "precomputed"))
