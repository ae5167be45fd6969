"""``phi4-train --config RECIPE`` prepares the sample data when the recipe uses ``${SAMPLE_DATA}``
and it is missing (as on a fresh checkout); one process per node builds it, the others wait."""
import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "SAMPLE_DATA")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra})
    # this checkout's package, whatever the working directory (the run starts in a temp dir)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def test_config_run_on_a_fresh_checkout_prepares_the_sample_data(tmp_path):
    sample = tmp_path / "fresh" / "sample_data"  # does not exist yet
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_phi4.train",
           "--config", str(REPO / "examples" / "recipes" / "tiny_cpu.yaml"), "--stage", "pretrain",
           f"run_dir={run}", "stages.pretrain.train_steps=2", "stages.pretrain.eval_interval=0",
           "checkpoint.interval=0", "logging.tensorboard=false"]
    r = subprocess.run(cmd, env=_env(SAMPLE_DATA=str(sample)), capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"preparing the sample data under {sample}" in r.stdout
    assert json.loads((sample / "manifest.json").read_text())["version"] >= 1
    assert "pretrain: 2 steps" in r.stdout


def test_uses_variable_reads_values_not_comments(tmp_path):
    from megatron_phi4.train import _uses_variable
    rec = tmp_path / "r.yaml"
    rec.write_text("# ${SAMPLE_DATA} in a comment only\nname: x\nstages: [{data: {kind: synthetic}}]\n")
    assert not _uses_variable(str(rec), [], "SAMPLE_DATA")
    assert _uses_variable(str(rec), ["stages.0.data.mixture=${SAMPLE_DATA}/m.yaml"], "SAMPLE_DATA")
    assert _uses_variable(str(REPO / "examples" / "recipes" / "tiny_cpu.yaml"), [], "SAMPLE_DATA")


def _rank(local_rank, root, log, q):
    import contextlib
    import time

    import megatron_phi4.demo.sample_data as sd
    from megatron_phi4.train import _ensure_sample_data

    def fake_build(dest, tokenizer=None):  # the coordination is under test, not the corpus
        with open(log, "a") as f:
            f.write(f"{local_rank}\n")
        time.sleep(0.5)
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, "manifest.json"), "w") as f:
            json.dump({"version": sd.SAMPLE_DATA_VERSION}, f)

    sd._build = fake_build
    sd._lock = lambda path: contextlib.nullcontext()  # as on a file system that ignores flock
    os.environ["LOCAL_RANK"] = str(local_rank)
    try:
        _ensure_sample_data(root)
        q.put((local_rank, sd.sample_data_ready(root)))
    except BaseException as e:  # noqa: BLE001
        q.put((local_rank, repr(e)))


def test_local_rank_zero_prepares_and_the_others_wait(tmp_path):
    root, log = str(tmp_path / "sd"), str(tmp_path / "builds.log")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, root, log, q)) for r in (3, 2, 1, 0)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got == {0: True, 1: True, 2: True, 3: True}
    assert open(log).read().split() == ["0"]  # built once, by local rank 0
