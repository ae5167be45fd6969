"""Acceptance tests of the multi-stage trainer on CPU (gloo, tiny model, synthetic data).

Runs are forked ranks (tests/distributed_utils.run_distributed) for speed; the signal / SIGKILL /
dead-rank tests run the real entry point in subprocesses. Failure injection goes through the
MEGATRON_PHI4_FAULT environment variable (see megatron_phi4/training/trainer.py).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_phi4.checkpoint.distributed import FAULT_ENV
from tests.distributed_utils import DistributedTestError, free_port, run_distributed

REPO = Path(__file__).resolve().parents[2]


def synthetic_recipe(run_dir, *, tp=1, pp=1, pre_steps=4, mid_steps=3, dpo_steps=0, interval=2, gbs=4,
                     max_skipped=5, keep_last=2):
    stages = [
        {"name": "pretrain", "train_steps": pre_steps, "eval_interval": 2,
         "data": {"kind": "synthetic", "seq_length": 16, "micro_batch_size": 1, "global_batch_size": gbs,
                  "validation": "heldout"},
         "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 1, "clip_grad": 1.0}},
        {"name": "midtrain", "train_steps": mid_steps, "eval_interval": mid_steps, "rope_theta": 250000.0,
         "data": {"kind": "synthetic", "seq_length": 32, "micro_batch_size": 1, "global_batch_size": gbs,
                  "min_document_tokens": 24, "validation": "heldout"},
         "optim": {"lr": 2e-4, "min_lr": 2e-5, "clip_grad": 1.0}},
    ]
    if dpo_steps:
        stages.append({"name": "dpo1", "train_steps": dpo_steps, "loss": {"type": "dpo", "dpo_beta": 0.1},
                       "data": {"kind": "synthetic", "seq_length": 16, "micro_batch_size": 1,
                                "global_batch_size": 2},
                       "optim": {"lr": 1e-3, "min_lr": 1e-4}})
    return {"name": "synthetic", "run_dir": str(run_dir), "seed": 11,
            "model": {"preset": "tiny", "num_layers": 2},
            "parallel": {"tp": tp, "pp": pp, "timeout_minutes": 1.0},
            "checkpoint": {"interval": interval, "keep_last": keep_last},
            "logging": {"tensorboard": False},
            "max_skipped_steps": max_skipped,
            "stages": stages}


def write_recipe(path, tree) -> str:
    Path(path).write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


def _train_rank(rank, world, recipe_path, overrides, stage, fault):
    import torch

    from megatron_phi4.config import load_recipe
    from megatron_phi4.distributed import init_distributed
    from megatron_phi4.training.trainer import Trainer

    torch.set_num_threads(1)
    if fault:
        os.environ[FAULT_ENV] = fault
    else:
        os.environ.pop(FAULT_ENV, None)
    recipe = load_recipe(recipe_path, overrides, world)
    dims = init_distributed(recipe.parallel, recipe.model)
    summary = Trainer(recipe, dims).run(stage)
    return summary if rank == 0 else None


def train(recipe_path, world=1, overrides=(), stage=None, fault=None, timeout=180):
    return run_distributed(_train_rank, world, recipe_path, list(overrides), stage, fault, timeout=timeout)[0]


def losses(run_dir, kind="train"):
    """{(stage, step): loss} from metrics.jsonl (the last record wins: a resumed step is re-logged)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind", "train") == kind and "loss" in r:
            out[(r["stage"], r["step"])] = r["loss"]
    return out


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def latest(run_dir) -> str:
    return (Path(run_dir) / "checkpoints" / "latest").read_text().strip()


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
    with pytest.raises(RuntimeError, match="apex"):
        build_optimizer(engine, OptimizerConfig(impl="apex"))
    assert torch.optim.AdamW is type(opt)


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
        train(path, world=2, fault="exit_after_step=3")
    assert latest(tmp_path / "run") == "pretrain/step_0000002"
    # die after global step 5 (mid-train step 1): latest = pretrain's final checkpoint (stage boundary)
    with pytest.raises(DistributedTestError, match="died|exit code"):
        train(path, world=2, fault="exit_after_step=5")
    assert latest(tmp_path / "run") == "pretrain/step_0000004"
    train(path, world=2)
    ref, got = losses(reference_run), losses(tmp_path / "run")
    assert len(ref) == 7 and set(got) == set(ref)
    assert got == ref  # bit-identical, step for step
    assert losses(tmp_path / "run", "eval") == losses(reference_run, "eval")


def test_resume_with_different_dp_size(reference_run, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", synthetic_recipe(tmp_path / "run"))
    with pytest.raises(DistributedTestError, match="died|exit code"):
        train(path, world=2, fault="exit_after_step=3")
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


# ----------------------------------------------------------------------------- faults
def test_crash_during_checkpoint_write_keeps_previous_latest(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", synthetic_recipe(tmp_path / "run", pre_steps=6))
    with pytest.raises(DistributedTestError, match="injected fault"):
        train(path, world=2, fault="crash_after_model_save=4")
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
    summary = train(path, overrides=[f"run_dir={tmp_path / 'one'}"], stage="pretrain", fault="nan_at_step=3")
    assert summary["stages"]["pretrain"]["skipped"] == 1
    recs = [r for r in records(tmp_path / "one") if r.get("kind", "train") == "train"]
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert all(r["loss"] == r["loss"] for r in recs)  # finite losses, later steps trained
    # three in a row: a clear error; the last good checkpoint stays `latest`
    with pytest.raises(DistributedTestError, match="3 consecutive steps had a non-finite"):
        train(path, stage="pretrain", fault="nan_at_step=5:7")
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


# ----------------------------------------------------------------------------- real entry point
def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            FAULT_ENV)}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra})
    return env


def _cli(*args):
    return [sys.executable, "-m", "megatron_phi4.train", *args]


def _wait_for(proc_out: Path, text: str, timeout: float, proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc_out.exists() and text in proc_out.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited early ({proc.returncode}):\n{proc_out.read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not seen within {timeout}s:\n{proc_out.read_text()}")


def test_sigterm_and_sigkill_with_real_entry_point(tmp_path):
    tree = synthetic_recipe(tmp_path / "run", pre_steps=12, mid_steps=2, interval=3)
    tree["stages"][0]["eval_interval"] = 0
    path = write_recipe(tmp_path / "r.yaml", tree)
    short = []
    slow = {FAULT_ENV: "step_sleep=0.25"}  # slow steps so the signals land mid-stage
    # uninterrupted reference (same process type and thread count)
    ref = subprocess.run(_cli("--config", path, f"run_dir={tmp_path / 'ref'}", *short), env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr[-3000:]
    # SIGTERM mid-training: complete checkpoint, exit 0
    out = tmp_path / "term.log"
    with open(out, "w") as f:
        p = subprocess.Popen(_cli("--config", path), env=_env(**slow), stdout=f, stderr=subprocess.STDOUT)
        _wait_for(out, "checkpoint", 60, p)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=60)
    text = out.read_text()
    assert rc == 0, text[-3000:]
    assert "stopped cleanly" in text
    stopped_at = json.loads((tmp_path / "run" / "checkpoints" / latest(tmp_path / "run") / "trainer.json")
                            .read_text())["step"]
    assert 3 <= stopped_at < 12
    ck = tmp_path / "run" / "checkpoints" / latest(tmp_path / "run")
    assert (ck / "meta.json").is_file() and (ck / "optim" / ".metadata").is_file()
    # resume with a budget of 12 pretrain steps, SIGKILL it after its next checkpoint
    if stopped_at < 9:
        out2 = tmp_path / "kill.log"
        with open(out2, "w") as f:
            p = subprocess.Popen(_cli("--config", path, *short), env=_env(**slow), stdout=f,
                                 stderr=subprocess.STDOUT)
            _wait_for(out2, "checkpoint", 60, p)
            time.sleep(0.3)  # land somewhere after that checkpoint (possibly inside the next step)
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
    fin = subprocess.run(_cli("--config", path, *short), env=_env(), capture_output=True, text=True, timeout=120)
    assert fin.returncode == 0, fin.stderr[-3000:]
    assert "resuming from" in fin.stdout and "=== summary" in fin.stdout
    ref_l = losses(tmp_path / "ref")
    assert losses(tmp_path / "run") == ref_l  # bit-identical after SIGTERM + SIGKILL + resume
    assert len(ref_l) == 14


def test_dead_rank_makes_the_other_exit(tmp_path):
    tree = synthetic_recipe(tmp_path / "run", pre_steps=50, interval=0)
    tree["parallel"]["timeout_minutes"] = 0.25
    path = write_recipe(tmp_path / "r.yaml", tree)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, PHI4_TRACEBACK="0")
        if rank == 1:
            env[FAULT_ENV] = "exit_after_step=2"
        procs.append(subprocess.Popen(_cli("--config", path), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    t0 = time.monotonic()
    try:
        out0, _ = procs[0].communicate(timeout=90)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].wait() == 137
    assert procs[0].returncode not in (0, None), out0[-2000:]
    assert time.monotonic() - t0 < 60


@pytest.mark.torchrun
def test_torchrun_four_ranks(tmp_path):
    tree = synthetic_recipe(tmp_path / "run", tp=2, pre_steps=2, mid_steps=1, dpo_steps=1, interval=0)
    path = write_recipe(tmp_path / "r.yaml", tree)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
           str(free_port()), "-m", "megatron_phi4.train", "--config", path]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert r.stdout.count("parallel layout: world 4 = pp 1 x dp 2 x tp 2") == 1
    assert "=== summary" in r.stdout and "dpo1: 1 steps" in r.stdout
    assert latest(tmp_path / "run") == "dpo1/step_0000001"


# ----------------------------------------------------------------------------- learning on real data
LOSS_TEST_STEPS = 300


def test_pretrain_loss_goes_below_unigram_entropy_and_tensorboard_has_it(sample_data, tmp_path):
    """The tiny_cpu pre-training stage on the sample corpus: held-out loss far below the initial
    ln(V) = 11.5 and below the unigram entropy of the held-out tokens (a model that learned only
    token frequencies); its TensorBoard events, read back with tensorboard's own reader, hold every
    scalar the trainer promises."""
    manifest = json.loads(Path(sample_data["manifest"]).read_text())
    unigram = manifest["pretrain_validation_unigram_entropy"]
    run = tmp_path / "run"
    cmd = _cli("--config", str(REPO / "examples" / "recipes" / "tiny_cpu.yaml"), "--stage", "pretrain",
               f"run_dir={run}", f"stages.pretrain.train_steps={LOSS_TEST_STEPS}",
               f"stages.pretrain.eval_interval={LOSS_TEST_STEPS}", "checkpoint.interval=0",
               "logging.tensorboard=true", "logging.log_interval=50")
    r = subprocess.run(cmd, env=_env(SAMPLE_DATA=sample_data["root"], OMP_NUM_THREADS="2"),
                       capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    evals = losses(run, "eval")
    val = evals[("pretrain", LOSS_TEST_STEPS)]
    first = losses(run)[("pretrain", 1)]
    print(f"\nfirst train loss {first:.3f}, final val loss {val:.3f}, unigram entropy {unigram:.3f} nats")
    assert first > 10.5
    assert val < unigram - 0.2, (val, unigram)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/tflops_per_device",
                "train/mfu", "train/mem/max_rss_gb", "train/skipped_steps", "train/consumed_samples",
                "train/tokens/code", "train/tokens/docs", "train/tokens/synthetic", "val/loss"}
    assert expected <= tags, expected - tags
    assert len(acc.Scalars("train/loss")) == LOSS_TEST_STEPS
    assert acc.Scalars("val/loss")[-1].value == pytest.approx(val, rel=1e-6)
    assert acc.Scalars("train/tflops_per_device")[-1].value > 0
    per_source = {s: acc.Scalars(f"train/tokens/{s}")[-1].value for s in ("code", "docs", "synthetic")}
    total = sum(per_source.values())
    assert total == LOSS_TEST_STEPS * 4 * 64  # global batch 4 x seq 64 per step
    assert per_source["code"] / total == pytest.approx(0.5, abs=0.02)  # the mixture's weights
