"""The real entry point (``python -m megatron_phi4.train``) in subprocesses: signals, SIGKILL at
random points (including in the middle of a checkpoint write), a dead rank, torchrun, the
configuration checks that run before anything starts, and learning on the sample corpus.

No fixed sleeps: a test-only callback (tests/training/faults.py) makes the child stop at a chosen
point and write a marker; the test waits for the marker, then signals. Timeouts are hang guards only.
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed_utils import free_port
from tests.training.helpers import (
    FAULTS, HANG_GUARD_S, REPO, cli, env, latest, losses, run_cli, synthetic_recipe, wait_for_file, write_recipe,
)


def _recipe_with_pause(tmp_path, tree, pause, name):
    marker = tmp_path / f"marker-{name}"
    marker.mkdir()
    t = json.loads(json.dumps(tree))
    t["callbacks"] = [{"type": FAULTS, "pause": pause, "marker_dir": str(marker)}]
    return write_recipe(tmp_path / f"{name}.yaml", t), marker


def _start(recipe_path, log_path):
    f = open(log_path, "w")
    return subprocess.Popen(cli("--config", recipe_path), env=env(), stdout=f, stderr=subprocess.STDOUT, cwd=REPO)


def test_sigterm_saves_and_exits_zero_then_resumes_bit_identically(tmp_path):
    tree = synthetic_recipe(tmp_path / "run", pre_steps=8, mid_steps=2, interval=3)
    ref_tree = {**tree, "run_dir": str(tmp_path / "ref")}
    assert run_cli("--config", write_recipe(tmp_path / "ref.yaml", ref_tree)).returncode == 0
    # hold the child at the start of global step 5, send a real SIGTERM, let it go on
    path, marker = _recipe_with_pause(tmp_path, tree, {"event": "pre_step", "global_step": 5, "release": True},
                                      "term")
    proc = _start(path, tmp_path / "term.log")
    wait_for_file(marker / "paused", proc, "step 5")
    proc.send_signal(signal.SIGTERM)
    (marker / "release").write_text("")
    assert proc.wait(timeout=HANG_GUARD_S) == 0, (tmp_path / "term.log").read_text()[-3000:]
    text = (tmp_path / "term.log").read_text()
    assert "stop requested (SIGTERM) at step 5" in text and "stopped cleanly" in text
    assert latest(tmp_path / "run") == "pretrain/step_0000005"
    done = run_cli("--config", write_recipe(tmp_path / "plain.yaml", tree))
    assert done.returncode == 0 and "resuming from" in done.stdout
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


KILL_POINTS = [("pre_step", None), ("post_backward", None), ("pre_optim_step", None), ("post_step", None),
               ("checkpoint_progress", "model"), ("checkpoint_progress", "optim"),
               ("checkpoint_progress", "rng")]


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path):
    """Three real SIGKILLs, each at a point drawn at random (the seed is printed) from the events of
    a step, the first always in the middle of a checkpoint write; after each the run resumes from
    ``latest``; the final losses equal an uninterrupted run's bit for bit."""
    seed = random.randrange(1 << 30)
    print(f"\nkill-point seed {seed}")
    rng = random.Random(seed)
    tree = synthetic_recipe(tmp_path / "run", pre_steps=9, mid_steps=3, interval=2)
    ref_tree = {**tree, "run_dir": str(tmp_path / "ref")}
    assert run_cli("--config", write_recipe(tmp_path / "ref.yaml", ref_tree)).returncode == 0
    done_steps = 0
    for k in range(3):
        if k == 0:  # a checkpoint is written at pre-training steps 2, 4, 6, 8 (global steps alike)
            event, component = "checkpoint_progress", rng.choice(["model", "optim", "rng"])
            step = rng.choice([s for s in (2, 4, 6, 8) if s > done_steps])
        else:
            event, component = rng.choice(KILL_POINTS)
            if event == "checkpoint_progress":
                step = rng.choice([s for s in (2, 4, 6, 8, 9, 11, 12) if s > done_steps] or [12])
            else:
                step = rng.randint(done_steps + 1, 12)
        pause = {"event": event, "global_step": step, **({"component": component} if component else {})}
        path, marker = _recipe_with_pause(tmp_path, tree, pause, f"kill{k}")
        proc = _start(path, tmp_path / f"kill{k}.log")
        try:
            wait_for_file(marker / "paused", proc, f"{pause}")
        except AssertionError:
            assert proc.wait(timeout=HANG_GUARD_S) == 0  # the point lay behind the resume point: ran through
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=HANG_GUARD_S)
        ckpts = tmp_path / "run" / "checkpoints"
        assert not (ckpts / "latest").exists() or (ckpts / latest(tmp_path / "run") / "meta.json").is_file(), \
            f"latest names an incomplete checkpoint after a kill at {pause}"
        done_steps = json.loads((ckpts / latest(tmp_path / "run") / "trainer.json").read_text())["global_step"] \
            if (ckpts / "latest").exists() else 0
    final = run_cli("--config", write_recipe(tmp_path / "plain.yaml", tree))
    assert final.returncode == 0, final.stderr[-3000:]
    assert losses(tmp_path / "run") == losses(tmp_path / "ref"), f"kill-point seed {seed}"


def test_dead_rank_makes_the_other_exit(tmp_path):
    tree = synthetic_recipe(tmp_path / "run", pre_steps=50, interval=0)
    tree["parallel"]["timeout_minutes"] = 0.25
    tree["callbacks"] = [{"type": FAULTS, "exit_after_step": 2, "rank": 1}]
    path = write_recipe(tmp_path / "r.yaml", tree)
    port = str(free_port())
    procs = [subprocess.Popen(cli("--config", path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=REPO, env=env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PHI4_TRACEBACK="0"))
             for r in range(2)]
    try:
        out0, _ = procs[0].communicate(timeout=HANG_GUARD_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].wait() == 137
    assert procs[0].returncode == 1, out0[-2000:]


@pytest.mark.torchrun
def test_torchrun_four_ranks(tmp_path):
    tree = synthetic_recipe(tmp_path / "run", tp=2, pre_steps=2, mid_steps=1, dpo_steps=1, interval=0)
    path = write_recipe(tmp_path / "r.yaml", tree)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
           str(free_port()), "-m", "megatron_phi4.train", "--config", path]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=REPO)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert r.stdout.count("parallel layout: world 4 = pp 1 x dp 2 x tp 2") == 1
    assert "=== summary" in r.stdout and "dpo1: 1 steps" in r.stdout
    assert latest(tmp_path / "run") == "dpo1/step_0000001"
    assert "apply_fsdp:" in r.stderr  # the library's one-line-per-verb logs reach the console (rank 0)


# ----------------------------------------------------------------------------- checks before anything starts
@pytest.mark.parametrize("case", ["bad_sft_path", "bad_mixture", "bad_load", "seq_too_long"])
def test_every_stage_input_is_checked_before_anything_starts(tmp_path, sample_data, case):
    """A typo in a later stage's input fails in seconds with exit status 2 and the field's name --
    before any process group, model or training step (nothing is written)."""
    recipe = str(REPO / "examples" / "recipes" / "tiny_cpu.yaml")
    run = tmp_path / "run"
    extra, field = {
        "bad_sft_path": (["stages.sft.data.paths=[/nonexistent/sft/train]"], "stages.sft.data.paths"),
        "bad_mixture": (["stages.pretrain.data.mixture=/nonexistent/mix.yaml"], "stages.pretrain.data.mixture"),
        "bad_load": (["checkpoint.load=/nonexistent/ckpt"], "checkpoint.load"),
        "seq_too_long": (["stages.midtrain.data.seq_length=4096"], "stages.midtrain.data.seq_length"),
    }[case]
    r = run_cli("--config", recipe, f"run_dir={run}", *extra, env_extra={"SAMPLE_DATA": sample_data["root"]})
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert "configuration error" in r.stderr and field in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not run.exists()


# ----------------------------------------------------------------------------- learning on real data
LOSS_TEST_STEPS = 300


def test_pretrain_loss_goes_below_unigram_entropy_and_tensorboard_has_it(sample_data, tmp_path):
    """The tiny_cpu pre-training stage on the sample corpus: held-out loss far below the initial
    ln(V) = 11.5 and below the unigram entropy of the held-out tokens (a model that learned only
    token frequencies); its TensorBoard events, read back with tensorboard's own reader, hold every
    scalar the trainer promises. Budgeted in steps, with no wall-clock limit."""
    manifest = json.loads(Path(sample_data["manifest"]).read_text())
    unigram = manifest["pretrain_validation_unigram_entropy"]
    run = tmp_path / "run"
    r = run_cli("--config", str(REPO / "examples" / "recipes" / "tiny_cpu.yaml"), "--stage", "pretrain",
                f"run_dir={run}", f"stages.pretrain.train_steps={LOSS_TEST_STEPS}",
                f"stages.pretrain.eval_interval={LOSS_TEST_STEPS}", "checkpoint.interval=0",
                "logging.tensorboard=true", "logging.log_interval=50",
                env_extra={"SAMPLE_DATA": sample_data["root"], "OMP_NUM_THREADS": "2"},
                timeout=None)  # one process (nothing to deadlock on): no wall-clock limit at all
    assert r.returncode == 0, r.stderr[-3000:]
    for where in (f"checkpoints: {run}/checkpoints", f"metrics:     {run}/metrics.jsonl",
                  f"tensorboard: tensorboard --logdir {run}/tensorboard"):
        assert where in r.stdout, r.stdout[-1500:]  # the summary says where everything went
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


_FINALIZATION_PROBE = '''
import atexit, faulthandler

class _Probe:
    def __del__(self):
        print("probe: interpreter finalization ran", flush=True)

_probe = _Probe()
atexit.register(lambda: print(f"probe: atexit ran, faulthandler {faulthandler.is_enabled()}", flush=True))
'''


@pytest.mark.parametrize("case", ["finished", "config_error"])
def test_the_process_runs_atexit_but_skips_interpreter_finalization(tmp_path, case):
    """``python -m megatron_phi4.train`` ends through ``train.cli``: gloo's threads are still running
    at exit (FSDP2 keeps the groups alive), so the process must not go through interpreter
    finalization, yet the atexit handlers run and main's status is the exit status."""
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(_FINALIZATION_PROBE)
    run = tmp_path / "run"
    tree = synthetic_recipe(run, pre_steps=1, mid_steps=0, interval=1)
    tree["stages"] = tree["stages"][:1]
    if case == "config_error":
        tree["stages"][0]["train_steps"] = -1
    r = run_cli("--config", write_recipe(tmp_path / "r.yaml", tree),
                env_extra={"PYTHONPATH": f"{probe_dir}:{REPO}"})
    assert r.returncode == (0 if case == "finished" else 2), (r.stdout[-2000:], r.stderr[-2000:])
    assert "probe: atexit ran, faulthandler True" in r.stdout, r.stdout[-2000:]
    assert "probe: interpreter finalization ran" not in r.stdout, r.stdout[-2000:]
    if case == "finished":
        assert "=== summary" in r.stdout and sorted(losses(run)) == [("pretrain", 1)], r.stdout[-2000:]


def test_the_console_script_ends_through_cli():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "phi4-train"]
    assert script.value == "megatron_phi4.train:cli"
