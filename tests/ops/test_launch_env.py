"""SLURM -> torch.distributed environment (megatron_phi4/launch/env.py) and the stop-signal glue
(megatron_phi4/launch/stop.py), without a cluster: pure functions, plus the real entry point in a
subprocess for the start-up signal and the requeue marker."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_phi4.launch.env import (
    SlurmEnvError, apply_slurm_env, expand_hostlist, expand_tasks_per_node, torch_env_from_slurm,
)
from megatron_phi4.launch.stop import STOP_MARKER, EarlyStop, clear_stop_marker, write_stop_marker

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- host lists
@pytest.mark.parametrize("text, hosts", [
    ("node1", ["node1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu[001-003,010],login1", ["gpu001", "gpu002", "gpu003", "gpu010", "login1"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("x-[3,1]y", ["x-3y", "x-1y"]),  # SLURM keeps the listed order
    ("h1,h2", ["h1", "h2"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["n[1-", "n]1[", "n[a-b]", "n[3-1]", ""])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(SlurmEnvError, match="host list"):
        expand_hostlist(bad)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("4(x2),2") == [4, 4, 2]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(SlurmEnvError, match="tasks-per-node"):
        expand_tasks_per_node("4(2)")


# ----------------------------------------------------------------------------- env translation
def _step(**kw):
    """The variables srun sets in task 5 of a 2-node x 4-task step (as observed on SLURM 22.05)."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_PROCID": "5",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[017-018]",
           "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURMD_NODENAME": "gpu018"}
    env.update(kw)
    return env


def test_srun_task_gets_torch_env():
    assert torch_env_from_slurm(_step()) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu017", "MASTER_PORT": str(20000 + 4242)}


def test_uneven_nodes_and_step_values_win_over_job_values():
    env = _step(SLURM_PROCID="9", SLURM_NODEID="2", SLURM_LOCALID="1", SLURM_STEP_NUM_TASKS="10",
                SLURM_NTASKS="16", SLURM_STEP_TASKS_PER_NODE="4(x2),2", SLURM_TASKS_PER_NODE="8(x2)",
                SLURM_STEP_NODELIST="b[2-4]", SLURM_JOB_NODELIST="b[1-4]")
    out = torch_env_from_slurm(env)
    assert (out["WORLD_SIZE"], out["LOCAL_WORLD_SIZE"], out["MASTER_ADDR"]) == ("10", "2", "b2")


def test_batch_shell_and_torchrun_are_left_alone():
    # the batch script itself has SLURM_PROCID=0 but is no job step: stays a single process
    batch = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "16",
             "SLURM_JOB_NODELIST": "n[1-2]"}
    assert torch_env_from_slurm(batch) == {}
    # torchrun already exported everything: nothing to add
    assert torch_env_from_slurm(_step(RANK="3", WORLD_SIZE="8")) == {}
    assert torch_env_from_slurm({}) == {}


def test_explicit_master_addr_and_port_win():
    out = torch_env_from_slurm(_step(MASTER_ADDR="10.1.2.3", MASTER_PORT="29999"))
    assert "MASTER_ADDR" not in out and "MASTER_PORT" not in out and out["RANK"] == "5"


def test_apply_slurm_env_exports_and_reports():
    env = _step()
    new = apply_slurm_env(env)
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and new["LOCAL_RANK"] == "1"
    assert apply_slurm_env(env) == {}  # idempotent


@pytest.mark.parametrize("change, field", [
    ({"SLURM_PROCID": "x"}, "SLURM_PROCID"),
    ({"SLURM_PROCID": "8"}, "SLURM_PROCID=8 is outside"),
    ({"SLURM_NODEID": "5"}, "SLURM_NODEID=5"),
    ({"SLURM_STEP_NODELIST": "gpu[1"}, "host list"),
])
def test_bad_slurm_values_name_the_variable(change, field):
    with pytest.raises(SlurmEnvError, match=field.replace("[", r"\[")):
        torch_env_from_slurm(_step(**change))


# ----------------------------------------------------------------------------- stop glue
class _Target:
    received = None


def test_early_stop_keeps_a_startup_signal_and_hands_it_over():
    before = signal.getsignal(signal.SIGUSR1)
    early = EarlyStop().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert early.received == signal.SIGUSR1
        target = _Target()
        early.hand_over(target)
        assert target.received == signal.SIGUSR1
        # after hand-over, a signal that still reaches the early handler goes to the target too
        t2 = _Target()
        early.hand_over(t2)
        early.received = None
        t2.received = None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert t2.received == signal.SIGTERM
    finally:
        early.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_marker_is_atomic_json_and_clearable(tmp_path):
    summary = {"stopped_by_signal": True, "global_step": 7,
               "stages": {"pretrain": {"steps": 7, "stopped": True}}}
    p = write_stop_marker(tmp_path / "run", summary)
    assert p == tmp_path / "run" / STOP_MARKER
    info = json.loads(p.read_text())
    assert info["stopped_stages"] == {"pretrain": 7} and info["global_step"] == 7
    assert [f.name for f in p.parent.iterdir()] == [STOP_MARKER]  # no temp file left behind
    clear_stop_marker(tmp_path / "run")
    clear_stop_marker(tmp_path / "run")  # idempotent
    assert not p.exists()


# ----------------------------------------------------------------------------- entry point
def _recipe(tmp_path, steps=6):
    tree = {"name": "launch", "run_dir": str(tmp_path / "run"), "seed": 3,
            "model": {"preset": "tiny", "num_layers": 1}, "parallel": {"timeout_minutes": 1.0},
            "checkpoint": {"interval": 0}, "logging": {"tensorboard": False},
            "stages": [{"name": "pretrain", "train_steps": steps,
                        "data": {"kind": "synthetic", "seq_length": 8, "micro_batch_size": 1,
                                 "global_batch_size": 1},
                        "optim": {"lr": 1e-3}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "MEGATRON_PHI4_FAULT"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def test_entry_point_as_srun_task_stops_on_a_startup_signal_and_leaves_the_marker(tmp_path):
    """``python -m megatron_phi4.train`` as task 0 of a one-task srun step (SLURM variables only,
    no torchrun), started with SIGUSR1 ignored as the SLURM launchers start it: SIGUSR1 is sent
    every 0.2 s while the process is still importing/initializing (until the layout is printed,
    i.e. before the trainer exists). The run must stop after its first step with a checkpoint, exit
    0 and leave ``stopped_by_signal``; the next run resumes, finishes and removes the marker."""
    cfg = _recipe(tmp_path)
    env = _clean_env(SLURM_JOB_ID="99", SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_LOCALID="0",
                     SLURM_NODEID="0", SLURM_STEP_NUM_TASKS="1", SLURM_STEP_TASKS_PER_NODE="1",
                     SLURM_STEP_NODELIST="localhost", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port()))
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "megatron_phi4.train", "--config", cfg], cwd=REPO, env=env,
                             stdout=f, stderr=subprocess.STDOUT,
                             preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
        deadline = time.monotonic() + 120
        while "parallel layout" not in log.read_text():
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()
            p.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
        rc = p.wait(timeout=120)
    text = log.read_text()
    assert rc == 0, text
    assert "parallel layout: world 1" in text and "stop requested (SIGUSR1) at step 1" in text, text
    marker = tmp_path / "run" / STOP_MARKER
    assert json.loads(marker.read_text())["slurm_job_id"] == "99"
    r = subprocess.run([sys.executable, "-m", "megatron_phi4.train", "--config", cfg], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from" in r.stdout and "pretrain: 6 steps" in r.stdout
    assert not marker.exists()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_entry_point_checks_the_batch_layout_of_the_selected_stage_only(tmp_path):
    """``--stage b`` on 2 ranks: stage a's global batch (3) does not split over dp 2, and need not;
    the run gets past the layout check to the next one (b's missing data), before any process
    group. Without ``--stage`` the layout error names stage a."""
    tree = yaml.safe_load(open(_recipe(tmp_path)))
    a = tree["stages"][0]
    a["name"], a["data"]["global_batch_size"] = "a", 3
    b = {"name": "b", "train_steps": 1, "data": {"kind": "sft", "paths": [str(tmp_path / "missing")],
                                                 "seq_length": 8, "micro_batch_size": 1, "global_batch_size": 2},
         "optim": {"lr": 1e-3}}
    tree["stages"] = [a, b]
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    env = _clean_env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    run = lambda *a: subprocess.run([sys.executable, "-m", "megatron_phi4.train", "--config", str(cfg), *a],
                                    cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    r = run("--stage", "b")
    assert r.returncode == 2 and "global_batch_size" not in r.stderr and "missing" in r.stderr, r.stderr
    r = run()
    assert r.returncode == 2 and "stages.a.data.global_batch_size" in r.stderr, r.stderr
