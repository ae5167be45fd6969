"""Acceptance tests of the multi-stage trainer on CPU (gloo, tiny model, synthetic data).

Runs are forked ranks (tests/training/helpers.train); faults are injected by a test-only callback
(tests/training/faults.py). The real entry point (signals, SIGKILL, torchrun) is tested in
test_entry_point.py, callbacks in test_callbacks.py, checkpoint lineage in test_lineage.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed_utils import DistributedTestError
from tests.training.helpers import latest, losses, records, synthetic_recipe, train, write_recipe


# ----------------------------------------------------------------------------- pure pieces
def test_lr_schedule_warmup_cosine_linear_constant():
    from megatron_phi4.config import OptimizerConfig
    from megatron_phi4.training.lr_schedule import lr_at

    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, warmup_steps=4, decay_style="cosine")
    lrs = [lr_at(s, cfg, 14) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    lin = OptimizerConfig(lr=1.0, min_lr=0.0, decay_style="linear")
    assert [lr_at(s, lin, 5) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    const = OptimizerConfig(lr=0.5, min_lr=0.0, decay_style="constant", warmup_steps=2)
    assert [lr_at(s, const, 5) for s in range(5)] == [0.25, 0.5, 0.5, 0.5, 0.5]


def test_optimizer_no_decay_on_norms_and_1d():
    import torch

    from megatron_phi4.config import OptimizerConfig, ParallelConfig, model_preset
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.training.lr_schedule import LRScheduler
    from megatron_phi4.training.optimizer import build_optimizer

    cfg = model_preset("tiny", num_layers=2)
    engine = ParallelEngine(cfg, ParallelConfig(dp_shard="none"), ParallelDims(1, 1, 1), seed=0)
    opt = build_optimizer(engine, OptimizerConfig(weight_decay=0.1))
    names = {id(p): n for n, p in engine.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            is_1d = p.ndim < 2 or "norm" in names[id(p)]
            assert g["weight_decay"] == (0.0 if is_1d else 0.1), names[id(p)]
    sched = LRScheduler(opt, OptimizerConfig(lr=1.0, min_lr=0.0, decay_style="linear"), 3)
    sched.step()
    state = sched.state_dict()
    sched2 = LRScheduler(opt, OptimizerConfig(lr=1.0, min_lr=0.0, decay_style="linear"), 3)
    sched2.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    assert torch.optim.AdamW is type(opt)


def test_optimizers_that_cannot_resume_are_refused_by_the_config():
    from megatron_phi4.config import ConfigError, OptimizerConfig

    with pytest.raises(ConfigError, match="optim.impl.*apex.*step count"):
        OptimizerConfig(impl="apex").validate("optim")


# ----------------------------------------------------------------------------- determinism
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted two-stage run (pretrain 4 steps, mid-train 3 steps) on DP 2."""
    d = tmp_path_factory.mktemp("ref")
    path = write_recipe(d / "r.yaml", synthetic_recipe(d / "run"))
    train(path, world=2)
    return d / "run"


def test_resume_after_kill_is_bit_identical_across_stage_boundary(reference_run, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", synthetic_recipe(tmp_path / "run"))
    # die (like SIGKILL) after global step 3: latest = pretrain step 2
    with pytest.raises(DistributedTestError, match="died|exit code"):
        train(path, world=2, faults={"exit_after_step": 3})
    assert latest(tmp_path / "run") == "pretrain/step_0000002"
    # die after global step 5 (mid-train step 1): latest = pretrain's final checkpoint (stage boundary)
    with pytest.raises(DistributedTestError, match="died|exit code"):
        train(path, world=2, faults={"exit_after_step": 5})
    assert latest(tmp_path / "run") == "pretrain/step_0000004"
    train(path, world=2)
    ref, got = losses(reference_run), losses(tmp_path / "run")
    assert len(ref) == 7 and set(got) == set(ref)
    assert got == ref  # bit-identical, step for step
    assert losses(tmp_path / "run", "eval") == losses(reference_run, "eval")


def test_resume_with_different_dp_size(reference_run, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", synthetic_recipe(tmp_path / "run"))
    with pytest.raises(DistributedTestError, match="died|exit code"):
        train(path, world=2, faults={"exit_after_step": 3})
    train(path, world=1)  # DP 2 -> DP 1 (same global batch: 4 micro-batches on one rank)
    ref, got = losses(reference_run), losses(tmp_path / "run")
    assert set(got) == set(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-5), k


def test_midtrain_stage_changes_seq_rope_and_lr(reference_run):
    from megatron_phi4.checkpoint.format import read_meta

    recs = records(reference_run)
    pre = [r for r in recs if r.get("kind", "train") == "train" and r["stage"] == "pretrain"]
    mid = [r for r in recs if r.get("kind", "train") == "train" and r["stage"] == "midtrain"]
    assert {r["seq_length"] for r in pre} == {16} and {r["seq_length"] for r in mid} == {32}
    assert {r["rope_theta"] for r in pre} == {10000.0} and {r["rope_theta"] for r in mid} == {250000.0}
    peak_pre, peak_mid = max(r["lr"] for r in pre), max(r["lr"] for r in mid)
    assert peak_mid == pytest.approx(peak_pre / 10)
    evals = [r for r in recs if r.get("kind") == "eval" and r["stage"] == "midtrain"]
    assert evals and "long_doc_loss" in evals[-1]
    meta = read_meta(reference_run / "checkpoints" / "midtrain" / "step_0000003")
    assert meta["model"]["rope_theta"] == 250000.0 and meta["stage"] == "midtrain" and meta["kind"] == "train"
    pre_meta = read_meta(reference_run / "checkpoints" / "pretrain" / "step_0000004")
    assert pre_meta["model"]["rope_theta"] == 10000.0
    ckpt = reference_run / "checkpoints" / "midtrain" / "step_0000003"
    for part in ("model/.metadata", "optim/.metadata", "trainer.json", "recipe.yaml", "rng/rank_00000.pt",
                 "rng/rank_00001.pt"):
        assert (ckpt / part).exists(), part
    # keep_last 2: pretrain keeps its two newest (its final one among them)
    assert sorted(p.name for p in (reference_run / "checkpoints" / "pretrain").iterdir()) == \
        ["step_0000002", "step_0000004"]


def _stage_batch_loss(recipe_path, stage_name, weights_ckpt, theta):
    """The LM loss of a stage's first global batch for the given weights and RoPE base, in one process."""
    from megatron_phi4.config import ParallelConfig, load_recipe
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.checkpoint.manager import load_model_weights_into
    from megatron_phi4.losses import LMLoss
    from megatron_phi4.data.stage import build_stage_data

    recipe = load_recipe(recipe_path)
    stage = recipe.stage(stage_name)
    engine = ParallelEngine(recipe.model, ParallelConfig(dp_shard="none"), ParallelDims(1, 1, 1))
    load_model_weights_into(weights_ckpt, engine)
    engine.set_rope_theta(theta)
    mbs = build_stage_data(stage, 0, 1, 0, stage.num_steps(), vocab_size=recipe.model.vocab_size).next_global_batch()
    return engine.forward_only(mbs, LMLoss(), engine.global_units(mbs, LMLoss()))["loss"]


def test_midtrain_rope_base_is_the_one_the_model_computes_with(tmp_path):
    """The first mid-training loss equals a one-process recomputation from pre-training's final
    weights *with RoPE base 250K*, and clearly differs from the same computation with 10K: the base
    is observed in the model's outputs, not in a logged config value. (A larger init_std makes
    attention position-sensitive enough for the two bases to differ far beyond the tolerance.)"""
    tree = synthetic_recipe(tmp_path / "run", pre_steps=2, mid_steps=1, interval=0)
    tree["model"]["init_std"] = 0.5
    for stage in tree["stages"]:
        stage["eval_interval"] = 0
    recipe_path = write_recipe(tmp_path / "r.yaml", tree)
    train(recipe_path)
    pre_final = tmp_path / "run" / "checkpoints" / "pretrain" / "step_0000002"
    logged = losses(tmp_path / "run")[("midtrain", 1)]
    with_250k = _stage_batch_loss(recipe_path, "midtrain", pre_final, 250000.0)
    with_10k = _stage_batch_loss(recipe_path, "midtrain", pre_final, 10000.0)
    assert logged == pytest.approx(with_250k, rel=1e-5)
    assert abs(with_10k - with_250k) > 20 * 1e-5 * abs(with_250k), (with_10k, with_250k)


# ----------------------------------------------------------------------------- resharding
def test_resume_under_other_layouts(tmp_path):
    """Checkpoint at TP2 x PP2 x DP2 (step 2), then step 3 under TP1xPP2xDP1 and TP2xPP1xDP2."""
    base = synthetic_recipe(tmp_path / "src", tp=2, pp=2, pre_steps=3, mid_steps=1, interval=2)
    base["stages"] = base["stages"][:1]
    path = write_recipe(tmp_path / "r.yaml", base)
    train(path, world=8, timeout=240)
    ref = losses(tmp_path / "src")[("pretrain", 3)]
    ckpt = tmp_path / "src" / "checkpoints" / "pretrain" / "step_0000002"
    for tp, pp, world in ((1, 2, 2), (2, 1, 4)):
        run = tmp_path / f"tp{tp}pp{pp}"
        train(path, world=world, overrides=[f"parallel.tp={tp}", f"parallel.pp={pp}", f"run_dir={run}",
                                            f"checkpoint.load={ckpt}"])
        got = losses(run)
        assert set(got) == {("pretrain", 3)}
        assert got[("pretrain", 3)] == pytest.approx(ref, abs=1e-5), (tp, pp)
        # The Adam moments and step counts were resharded too: after the same third update, the
        # final optimizer state equals the uninterrupted source run's (a fresh optimizer would not).
        src_opt = _optim_state(tmp_path / "src" / "checkpoints" / "pretrain" / "step_0000003")
        got_opt = _optim_state(run / "checkpoints" / "pretrain" / "step_0000003")
        assert set(got_opt) == set(src_opt) and any(k.endswith(".exp_avg_sq") for k in src_opt)
        for k, v in src_opt.items():
            torch.testing.assert_close(got_opt[k], v, rtol=1e-4, atol=1e-8, msg=f"{k} at tp{tp} pp{pp}")


def _optim_state(ckpt) -> dict:
    """Every tensor of a checkpoint's optim/ directory, read in one process with DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(Path(ckpt) / "optim"))
    md = reader.read_metadata()
    out = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
           if isinstance(v, TensorStorageMetadata)}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


# ----------------------------------------------------------------------------- faults
def test_crash_during_checkpoint_write_keeps_previous_latest(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", synthetic_recipe(tmp_path / "run", pre_steps=6))
    with pytest.raises(DistributedTestError, match="injected fault"):
        train(path, world=2, faults={"crash_in_checkpoint": 4})
    root = tmp_path / "run" / "checkpoints"
    assert latest(tmp_path / "run") == "pretrain/step_0000002"
    assert sorted(p.name for p in (root / "pretrain").iterdir()) == ["step_0000002"]  # no partial/tmp dir
    assert (root / "pretrain" / "step_0000002" / "meta.json").is_file()
    # and the run resumes from it
    train(path, world=2, overrides=["stages.pretrain.train_steps=3"], stage="pretrain")
    assert latest(tmp_path / "run") == "pretrain/step_0000003"


def test_non_finite_steps_skipped_then_stop(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", synthetic_recipe(tmp_path / "run", pre_steps=8, max_skipped=3))
    # one bad step: skipped, counted, training goes on
    summary = train(path, overrides=[f"run_dir={tmp_path / 'one'}"], stage="pretrain", faults={"nan_steps": [3, 3]})
    assert summary["stages"]["pretrain"]["skipped"] == 1
    recs = [r for r in records(tmp_path / "one") if r.get("kind", "train") == "train"]
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert all(r["loss"] == r["loss"] for r in recs)  # finite losses, later steps trained
    # three in a row: a clear error; the last good checkpoint stays `latest`
    with pytest.raises(DistributedTestError, match="3 consecutive steps had a non-finite"):
        train(path, stage="pretrain", faults={"nan_steps": [5, 7]})
    assert latest(tmp_path / "run") == "pretrain/step_0000004"
    assert not any(".tmp-" in p.name for p in (tmp_path / "run" / "checkpoints" / "pretrain").iterdir())


def test_dpo_reference_is_stage_initial_weights(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", synthetic_recipe(tmp_path / "run", pre_steps=2, mid_steps=1,
                                                              dpo_steps=3, interval=0))
    train(path)
    got = losses(tmp_path / "run")
    # at the first DPO step policy == reference: loss is exactly log 2; then it moves
    assert got[("dpo1", 1)] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert abs(got[("dpo1", 2)] - got[("dpo1", 1)]) > 1e-6  # the policy moved away from the reference
    # --stage dpo1 again: restarts from midtrain's final weights (reference = same), same losses
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "dpo1")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("midtrain/step_0000001\n")
    train(path, stage="dpo1", overrides=[f"run_dir={tmp_path / 'again'}",
                                         f"checkpoint.dir={tmp_path / 'run' / 'checkpoints'}"])
    assert losses(tmp_path / "again") == {k: v for k, v in got.items() if k[0] == "dpo1"}


