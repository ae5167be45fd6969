"""Checkpoint lineage and the defects found in review: ``latest`` never names a removed or rewritten
checkpoint; a run only ever reads checkpoints of its own lineage; a fresh run refuses a directory
holding another run; continuing a stage in memory equals resuming it (weight decay included)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.distributed_utils import DistributedTestError
from tests.training.helpers import latest, losses, synthetic_recipe, train, write_recipe


def _tiny_engine():
    from megatron_phi4.config import ParallelConfig, model_preset
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine

    return ParallelEngine(model_preset("tiny"), ParallelConfig(dp_shard="none"), ParallelDims(1, 1, 1), seed=0)


def _tree_state(path):
    return sorted((str(p.relative_to(path)), p.stat().st_ino, p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_resaving_a_step_never_touches_the_checkpoint_latest_names(tmp_path):
    from megatron_phi4.checkpoint.format import CheckpointError
    from megatron_phi4.checkpoint.manager import CheckpointManager, ModelWeights
    from megatron_phi4.config import model_preset

    engine = _tiny_engine()
    mgr = CheckpointManager(tmp_path, run_id="run-a")
    first = mgr.save("pretrain", 2, [ModelWeights(engine)], trainer_state={}, model_cfg=model_preset("tiny"))
    before = _tree_state(first)

    def crash(tmp, name):  # any write attempt would die half-way
        raise RuntimeError("injected crash while re-saving")

    mgr.on_progress = crash
    with torch.no_grad():  # the state changed since -- still, a published checkpoint is never rewritten
        next(iter(engine.parameters())).add_(1.0)
    again = mgr.save("pretrain", 2, [ModelWeights(engine)], trainer_state={}, model_cfg=model_preset("tiny"))
    assert again == first and _tree_state(first) == before
    assert (tmp_path / "latest").read_text().strip() == "pretrain/step_0000002"
    # another lineage may not overwrite it either
    other = CheckpointManager(tmp_path, run_id="run-b")
    with pytest.raises(CheckpointError, match="belongs to another run"):
        other.save("pretrain", 2, [ModelWeights(engine)], trainer_state={}, model_cfg=model_preset("tiny"))
    assert _tree_state(first) == before


def test_fresh_run_refuses_a_directory_holding_another_runs_checkpoints(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", synthetic_recipe(tmp_path / "run", pre_steps=2, mid_steps=1))
    train(path)
    ckpts = tmp_path / "run" / "checkpoints"
    before = _tree_state(ckpts)
    with pytest.raises(DistributedTestError, match="checkpoint.load: 'none' starts a new run"):
        train(path, overrides=["checkpoint.load=none", "stages.pretrain.train_steps=1"])
    assert _tree_state(ckpts) == before


def test_a_stage_starts_from_its_own_runs_checkpoint_not_a_foreign_higher_step(tmp_path):
    """Run B shares its stage directory with a checkpoint of run A that has a higher step number:
    B's mid-training must start from B's own pre-training result (and B's pruning leaves A's alone)."""
    a = write_recipe(tmp_path / "a.yaml", synthetic_recipe(tmp_path / "a", pre_steps=4, mid_steps=1))
    train(a, stage="pretrain")
    tree_b = synthetic_recipe(tmp_path / "b", pre_steps=4, mid_steps=2, interval=1, keep_last=1)
    tree_b["seed"] = 12
    b = write_recipe(tmp_path / "b.yaml", tree_b)
    ref = write_recipe(tmp_path / "ref.yaml", {**tree_b, "run_dir": str(tmp_path / "ref")})
    train(ref)  # B's uninterrupted twin
    train(b, stage="pretrain")
    foreign = tmp_path / "b" / "checkpoints" / "pretrain" / "step_0000099"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "pretrain" / "step_0000004", foreign)
    train(b, stage="midtrain")
    assert losses(tmp_path / "b")[("midtrain", 1)] == losses(tmp_path / "ref")[("midtrain", 1)]
    assert foreign.is_dir()  # never pruned: not this run's
    assert latest(tmp_path / "b") == "midtrain/step_0000002"


def test_continuing_a_stage_in_memory_equals_resuming_it(tmp_path):
    """With reset_optimizer false the next stage keeps Adam's moments; its weight decay, betas and
    eps must be the new stage's whether the run continues in memory or restarts at the boundary."""
    tree = synthetic_recipe(tmp_path / "mem", pre_steps=3, mid_steps=3, interval=0)
    tree["stages"][0]["optim"].update(weight_decay=0.1, beta2=0.95)
    tree["stages"][1]["optim"].update(weight_decay=0.9, beta2=0.99, eps=1e-6)
    tree["stages"][1]["reset_optimizer"] = False
    mem = write_recipe(tmp_path / "mem.yaml", tree)
    cut = write_recipe(tmp_path / "cut.yaml", {**tree, "run_dir": str(tmp_path / "cut")})
    train(mem)
    with pytest.raises(DistributedTestError, match="died|exit code"):
        train(cut, faults={"exit_after_step": 3})  # dies at the boundary, after pre-training's final save
    assert latest(tmp_path / "cut") == "pretrain/step_0000003"
    train(cut)
    got, ref = losses(tmp_path / "cut"), losses(tmp_path / "mem")
    assert set(got) == set(ref) and len(ref) == 6
    assert got == ref  # bit-identical, the mid-training steps included
