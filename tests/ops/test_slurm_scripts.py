"""The shell logic of examples/slurm/ without a cluster: fake ``srun``/``scontrol``/``sbatch``/python on
PATH record what the scripts ask for and play the parts (training stopped by a signal, finished,
failed). Fast, and runs where SLURM is not installed; tests/ops/test_slurm_cluster.py runs the same
scripts on a real SLURM."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "examples" / "slurm" / "train.sbatch"
NODE = REPO / "examples" / "slurm" / "torchrun_node.sh"

FAKE_SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
case "$1 $2" in
  "show hostnames") echo gpu017; echo gpu018 ;;
  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.9.0.${3: -2} NodeHostName=$3" ;;
  "requeue "*) ;;
esac
"""

# srun: record argv; then act per FAKE_SRUN: ok | stop | fail (no marker) | stop_then_fail (a worker
# failed after rank 0 wrote the marker) | wait (until SIGUSR1, then stop)
FAKE_SRUN = r"""#!/bin/bash
echo "srun $*" >> "$FAKE_LOG"
stop() { echo "srun got USR1" >> "$FAKE_LOG"; got=1; }
trap stop USR1
got=0
case "$FAKE_SRUN" in
  ok) exit 0 ;;
  fail) exit 1 ;;
  stop_then_fail) echo '{}' > "$RUN_DIR/stopped_by_signal"; exit 137 ;;
  stop) echo '{}' > "$RUN_DIR/stopped_by_signal"; exit 0 ;;
  wait) echo ready > "$FAKE_READY"
        for i in $(seq 600); do (( got )) && break; sleep 0.05; done
        (( got )) || exit 9
        echo '{}' > "$RUN_DIR/stopped_by_signal"; exit 0 ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CONTAINER_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), FAKE_READY=str(tmp_path / "ready"),
               SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[017-018]",
               SLURM_SUBMIT_DIR=str(REPO), RUN_DIR=str(tmp_path / "run"), RECIPE="r.yaml", STAGE="sft",
               NPROC_PER_NODE="8")
    return env, log


def _sbatch(env, *args, mode="ok", **extra):
    return subprocess.Popen(["bash", str(SBATCH), *args], env={**env, "FAKE_SRUN": mode, **extra},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _srun_line(log: Path) -> str:
    return next(line for line in log.read_text().splitlines() if line.startswith("srun"))


def test_srun_command_on_the_host(fake):
    env, log = fake
    p = _sbatch(env, "parallel.tp=2", "parallel.pp=4")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    line = _srun_line(log)
    assert "--nodes=2 --kill-on-bad-exit=1 --ntasks-per-node=1" in line
    assert f"--chdir={REPO}" in line and "--container" not in line
    assert (f"bash {NODE} -m megatron_phi4.train --config r.yaml --stage sft "
            f"run_dir={env['RUN_DIR']} parallel.tp=2 parallel.pp=4") in line
    assert "head 10.9.0.17:" in out and "finished" in out and "scontrol requeue" not in log.read_text()


def test_srun_command_in_a_pyxis_container(fake):
    env, log = fake
    p = _sbatch(env, CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.12-py3")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    line = _srun_line(log)
    assert "--container-image=nvcr.io#nvidia/pytorch:25.12-py3" in line
    assert f"--container-mounts={REPO}:{REPO},{env['RUN_DIR']}:{env['RUN_DIR']}" in line
    assert f"--container-workdir={REPO}" in line and "--chdir" not in line
    p = _sbatch(env, CONTAINER_IMAGE="img.sqsh", CONTAINER_MOUNTS="/lustre:/lustre")
    p.communicate(timeout=60)
    assert "--container-mounts=/lustre:/lustre" in log.read_text().splitlines()[-1]


def test_srun_launcher_one_task_per_gpu(fake):
    env, log = fake
    p = _sbatch(env, LAUNCHER="srun", PYTHON="/opt/py/bin/python")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    line = _srun_line(log)
    assert "--ntasks=16 --ntasks-per-node=8" in line and "torchrun_node.sh" not in line
    assert "/opt/py/bin/python -m megatron_phi4.train" in line
    assert "trap" in line  # the workers start with the stop signals ignored


def test_requeue_only_after_a_saved_stop_on_a_signal(fake):
    env, log = fake
    Path(env["RUN_DIR"]).mkdir()
    (Path(env["RUN_DIR"]) / "stopped_by_signal").write_text("{}")  # stale: must be removed first
    p = _sbatch(env, mode="ok")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and "scontrol requeue" not in log.read_text() and "finished" in out
    p = _sbatch(env, mode="stop")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and "scontrol requeue 4242" in log.read_text(), out
    log.write_text("")
    p = _sbatch(env, mode="fail")  # no marker, a failed step: no requeue, the failure is reported
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 1 and "scontrol requeue" not in log.read_text() and "training failed (exit 1)" in out
    # the marker, then a worker failed on its way out: the stop's checkpoint is complete, requeue anyway
    log.write_text("")
    p = _sbatch(env, mode="stop_then_fail")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and "scontrol requeue 4242" in log.read_text(), out
    assert "requeueing job 4242 although a worker failed on its way out (exit 137)" in out, out
    log.write_text("")
    p = _sbatch(env, mode="stop", REQUEUE="0")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and "scontrol requeue" not in log.read_text() and "REQUEUE=0" in out


def _wait_ready(env, p):
    deadline = time.monotonic() + 30
    while not Path(env["FAKE_READY"]).exists():
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


def test_batch_shell_forwards_usr1_to_srun_and_requeues(fake):
    """--signal=B:USR1@T / scancel --batch: the batch shell alone gets SIGUSR1; it must relay it to
    srun (which relays it to the step), wait for the step to end cleanly, then requeue."""
    env, log = fake
    p = _sbatch(env, mode="wait")
    _wait_ready(env, p)
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=60)
    calls = log.read_text()
    assert p.returncode == 0, out
    assert "srun got USR1" in calls and "scontrol requeue 4242" in calls, (out, calls)
    assert "SIGUSR1: asking the workers to save" in out


def test_sigterm_to_the_batch_shell_waits_but_never_requeues(fake):
    """SLURM ending the job (scancel, time limit) sends SIGTERM to everything; the batch shell must
    neither die nor kill srun (the workers are saving), and must not requeue afterwards."""
    env, log = fake
    p = _sbatch(env, mode="wait")
    _wait_ready(env, p)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert p.poll() is None  # still waiting for srun
    p.send_signal(signal.SIGUSR1)  # let the fake step finish with a marker
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert "scontrol requeue" not in log.read_text() and "not requeueing (SLURM is ending the job)" in out


def test_usr1_is_resent_until_the_step_ends(fake):
    """A copy of SIGUSR1 that lands while torchrun is still starting its workers is lost; the batch
    shell re-sends every STOP_RESEND_S seconds until srun exits."""
    env, log = fake
    slow = FAKE_SRUN.replace("stop() {", "stop() { (( ++n < 3 )) && return; ")  # ignore the first two
    (Path(env["PATH"].split(":")[0]) / "srun").write_text(slow)
    p = _sbatch(env, mode="wait", STOP_RESEND_S="0.3")
    _wait_ready(env, p)
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and "scontrol requeue 4242" in log.read_text(), out


# stands in for the interpreter: answers the torch-version query, "runs" torch.distributed.run
FAKE_PYTHON = r"""#!/usr/bin/env python3
import os, signal, sys
if sys.argv[1:2] == ["-c"]:
    print(os.environ.get("FAKE_TORCH_VERSION", "2.13.0"))
    sys.exit(0)
print("TORCHRUN", " ".join(sys.argv[1:]))
print("DISPOSITION", signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,
      signal.getsignal(signal.SIGTERM) == signal.SIG_IGN, os.environ.get("PET_SIGNALS_TO_HANDLE"))
sys.exit(int(os.environ.get("FAKE_TORCHRUN_RC", "0")))
"""


def _node_env(tmp_path, node_id, name, **extra):
    fake_python = tmp_path / "fake_python"
    fake_python.write_text(FAKE_PYTHON)
    fake_python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(PYTHON=str(fake_python), NNODES="2", NPROC_PER_NODE="8", HEAD_ADDR="10.9.0.17",
               RDZV_PORT="29555", NODE_ADDRS="gpu017=10.9.0.17 gpu018=10.9.0.18 ", SLURM_NODEID=node_id,
               SLURMD_NODENAME=name, SLURM_JOB_ID="4242", FAKE_TORCHRUN_RC="3", **extra)
    return env


@pytest.mark.parametrize("node_id, name, is_host", [("0", "gpu017", 1), ("1", "gpu018", 0)])
def test_node_script_starts_torchrun_shielded_from_stop_signals(tmp_path, node_id, name, is_host):
    env = _node_env(tmp_path, node_id, name)
    r = subprocess.run(["bash", str(NODE), "-m", "megatron_phi4.train", "--config", "r.yaml"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3  # torchrun's status is the task's status
    args = next(line for line in r.stdout.splitlines() if line.startswith("TORCHRUN")).split()[1:]
    joined = " ".join(args)
    assert joined.startswith("-m torch.distributed.run ")  # torchrun, from the workers' own interpreter
    assert ("--nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint 10.9.0.17:29555 "
            f"--rdzv-id 4242 --rdzv-conf is_host={is_host} --local-addr 10.9.0.{17 + int(node_id)}") in joined
    assert joined.endswith("-m megatron_phi4.train --config r.yaml")
    # SIGUSR1 and SIGTERM ignored in torchrun (inherited by its workers until the trainer's
    # handler replaces it), and SIGTERM taken out of the set torchrun handles itself
    assert "DISPOSITION True True SIGINT,SIGHUP,SIGQUIT" in r.stdout
    assert f"node {name} (10.9.0.{17 + int(node_id)}) is node {node_id} of 2" in r.stdout
    assert "WARNING" not in r.stderr


def test_node_script_warns_about_torch_without_signals_to_handle(tmp_path):
    r = subprocess.run(["bash", str(NODE), "-m", "x"], env=_node_env(tmp_path, "0", "gpu017",
                                                                     FAKE_TORCH_VERSION="2.8.0a0+5228986c39"),
                       capture_output=True, text=True, timeout=60)
    assert "torch 2.8.0a0+5228986c39 < 2.9 has no --signals-to-handle" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- per-stage submission
FAKE_SBATCH = r"""#!/bin/bash
n=$(( $(wc -l < "$FAKE_LOG") + 1001 ))
echo "sbatch $*" >> "$FAKE_LOG"
echo "$n;phi4"
"""
SUBMIT = REPO / "examples" / "slurm" / "submit_phi4_14b.sh"


def _submit_14b(tmp_path, *args, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "NODES", "TIME", "DRY_RUN"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), RUN_DIR=str(tmp_path / "run"), **extra)
    r = subprocess.run(["bash", str(SUBMIT), *args], env=env, capture_output=True, text=True, timeout=60)
    return r, log.read_text().splitlines()


def _opt(line: str, name: str) -> str | None:
    return next((w.split("=", 1)[1] for w in line.split() if w.startswith(f"--{name}=")), None)


def test_submit_all_stages_chains_them_with_their_own_sizes(tmp_path):
    r, calls = _submit_14b(tmp_path, "all", "checkpoint.interval=1000")
    assert r.returncode == 0, r.stderr
    stages = ["pretrain", "midtrain", "sft", "dpo1", "dpo2"]
    assert [_opt(c, "job-name") for c in calls] == [f"phi4-{s}" for s in stages]
    assert [_opt(c, "nodes") for c in calls] == ["240", "120", "16", "16", "16"]
    assert all(_opt(c, "gpus-per-node") == "8" for c in calls)
    # each stage waits for the previous one to succeed (a requeued job is not done yet)
    assert [_opt(c, "dependency") for c in calls] == [None, "afterok:1001", "afterok:1002", "afterok:1003",
                                                      "afterok:1004"]
    for stage, c in zip(stages, calls):
        assert f"STAGE={stage}," in _opt(c, "export") and f"RUN_DIR={tmp_path / 'run'}" in _opt(c, "export")
        assert _opt(c, "output") == f"{tmp_path / 'run' / 'logs'}/%x-%j.out"
        assert c.endswith("checkpoint.interval=1000")  # the caller's overrides come last
    assert "parallel.pp=4 parallel.pp_schedule=interleaved_1f1b parallel.virtual_stages=2" in calls[0]
    assert all("parallel.recompute=full" in c for c in calls[1:])
    assert (tmp_path / "run" / "logs").is_dir()  # SLURM does not create the log directory


def test_submit_one_stage_with_overrides_and_bad_input(tmp_path):
    r, calls = _submit_14b(tmp_path, "sft", NODES="4", TIME="01:00:00")
    assert r.returncode == 0 and len(calls) == 1, r.stderr
    assert (_opt(calls[0], "nodes"), _opt(calls[0], "time"), _opt(calls[0], "dependency")) == ("4", "01:00:00", None)
    r, calls = _submit_14b(tmp_path, "posttrain")
    assert r.returncode == 2 and not calls and "unknown stage 'posttrain'" in r.stderr
    r, calls = _submit_14b(tmp_path, "all", NODES="4")
    assert r.returncode == 2 and not calls and "single stage" in r.stderr
    r, calls = _submit_14b(tmp_path, "dpo2", DRY_RUN="1")
    assert r.returncode == 0 and not calls and "--job-name=phi4-dpo2" in r.stderr


@pytest.mark.parametrize("stage", ["pretrain", "midtrain", "sft", "dpo1", "dpo2"])
def test_each_stage_layout_is_valid_for_the_14b_recipe_at_its_size(tmp_path, stage):
    """The layout each job passes must load (batch divisible by micro-batch x dp, TP/PP valid) at
    the job's world size -- checked for that stage alone, as ``--stage`` runs it."""
    from megatron_phi4.config import ConfigError, load_recipe

    r, calls = _submit_14b(tmp_path, stage, DRY_RUN="1")
    line = next(c for c in r.stderr.splitlines() if c.startswith("sbatch "))
    world = int(_opt(line, "nodes")) * int(_opt(line, "gpus-per-node"))
    overrides = [w for w in line.split(str(REPO / "examples/slurm/train.sbatch"))[1].split()]
    recipe_path = REPO / "examples" / "recipes" / "phi4_14b.yaml"
    variables = {"RECIPE_DIR": str(recipe_path.parent), "SAMPLE_DATA": str(tmp_path)}
    recipe = load_recipe(recipe_path, overrides, world, variables=variables, stage_name=stage)
    dp = recipe.parallel.resolved_dp(world)
    gbs = recipe.stage(stage).data.global_batch_size
    assert gbs % dp == 0 and dp * recipe.parallel.tp * recipe.parallel.pp == world
    if stage == "pretrain":  # the other stages' batches do not split over 240 replicas
        with pytest.raises(ConfigError, match="global_batch_size"):
            load_recipe(recipe_path, overrides, world, variables=variables)
