"""The project's own launch scripts on a real SLURM (two slurmd "nodes" on this machine) and plain
two-node torchrun, on CPU with gloo. Every check compares with a single-process run of the same
recipe (losses from metrics.jsonl, rel 1e-5).

* ``examples/slurm/train.sbatch`` on 2 nodes x 2 processes (TP2 x DP2): trains on both nodes,
  losses equal, checkpoint written, exit 0, no requeue; and with ``LAUNCHER=srun`` (no torchrun,
  ranks from SLURM's variables; TP2 x PP2).
* pre-emption, both ways a batch shell is warned: the time limit (``--time=1
  --signal=B:USR1@50``) and ``scancel --signal=USR1 -b``; each time every worker gets the signal,
  saves, exits 0, the script requeues the job, and the requeued job resumes from ``latest``; after
  two requeues the run completes with the losses of an uninterrupted run (PP2 x DP2). In the
  second run one worker dies with SIGABRT on its way out, after the checkpoint: requeued anyway.
  The second signal is sent while all workers are held after a known step, and they stay held
  until *each* of them has it; the time limit's warning lands wherever SLURM's periodic check puts
  it (during start-up it is kept and stops the run after step 1; otherwise the run holds at step 2
  for it).
* ``torchrun --nnodes 2`` without SLURM on 127.0.0.2 / 127.0.0.3 (TP2 x PP2): one node is killed
  mid-step; the survivor fails with a clear error well within ``parallel.timeout_minutes``; a
  restart of both nodes resumes from the checkpoint and finishes with the same losses.

Traffic stays on loopback: nodes at 127.0.0.2/.3, the controller on 127.0.0.1, gloo on ``lo``.
Hang guards only (generous): a busy 2-core machine must never reach them.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ops.slurm_cluster import MiniSlurm, _alive, _descendants, free_port
from tests.training.helpers import REPO, losses, synthetic_recipe, train, write_recipe

SBATCH = REPO / "examples" / "slurm" / "train.sbatch"
HANG_GUARD_S = 900
PRE_STEPS, MID_STEPS = 4, 3  # global steps 1-4 pretrain, 5-7 midtrain
TIMEOUT_MINUTES = 1.0  # parallel.timeout_minutes of every run here

pytestmark = pytest.mark.skipif(MiniSlurm.unavailable() is not None,
                                reason=f"no SLURM test cluster here: {MiniSlurm.unavailable()}")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster():
    c = MiniSlurm()
    try:
        c.start()
        yield c
    finally:
        c.stop()  # every daemon and job process, by PID, also when a test failed
        c.cleanup()


def _recipe_tree(run_dir, **parallel):
    tree = synthetic_recipe(run_dir, pre_steps=PRE_STEPS, mid_steps=MID_STEPS, interval=2)
    tree["parallel"].update(parallel, timeout_minutes=TIMEOUT_MINUTES)
    return tree


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """{(stage, step): loss} of the recipe run as one process."""
    d = tmp_path_factory.mktemp("reference")
    train(write_recipe(d / "r.yaml", _recipe_tree(d / "run")), world=1)
    out = losses(d / "run")
    assert len(out) == PRE_STEPS + MID_STEPS
    return out


def _assert_losses_match(run_dir, reference, what):
    got = losses(run_dir)
    assert sorted(got) == sorted(reference), f"{what}: steps logged {sorted(got)}"
    for key, ref in reference.items():
        assert got[key] == pytest.approx(ref, rel=1e-5), f"{what}: loss at {key} {got[key]} != single-process {ref}"


def _job_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), GLOO_SOCKET_IFNAME="lo",
               PYTHON=sys.executable, **extra)
    return env


def _submit(cluster, tmp_path, recipe, *sbatch_args, overrides=(), env=None):
    out = tmp_path / "job.out"
    # STOP_RESEND_S: a warning that lands while torchrun is still starting reaches no worker; the
    # batch shell re-sends it (30 s by default), sooner here so the one-minute job has time to stop
    job_env = _job_env(RECIPE=str(recipe), RUN_DIR=str(tmp_path / "run"), NPROC_PER_NODE="2", REPO=str(REPO),
                   RDZV_PORT=str(free_port("127.0.0.2")), STOP_RESEND_S="5", **(env or {}))
    job = cluster.sbatch("--nodes=2", f"--output={out}", *sbatch_args, str(SBATCH), *overrides, env=job_env, cwd=REPO)
    return job, out


def _wait_for(predicate, what, out=None, cluster=None, timeout=HANG_GUARD_S):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            log = out.read_text() if out is not None and out.exists() else ""
            raise AssertionError(f"hang guard: {what}\n{log[-4000:]}\n{cluster.logs() if cluster else ''}")
        time.sleep(0.5)


def _files(d: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in d.glob(prefix + "*") if not p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- SLURM
def test_sbatch_two_nodes_trains_like_one_process(cluster, reference, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe_tree(tmp_path / "run", tp=2))
    job, out = _submit(cluster, tmp_path, recipe)
    info = cluster.wait_job(job, HANG_GUARD_S)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}\n{cluster.logs()}"
    # one torchrun per node, each with its own address, both finished cleanly
    for node, addr, rank in (("n1", "127.0.0.2", 0), ("n2", "127.0.0.3", 1)):
        assert f"node {node} ({addr}) is node {rank} of 2: 2 workers, rendezvous 127.0.0.2:" in log, log
        assert f"node {node}: torchrun exited 0" in log, log
    assert "parallel layout: world 4 = pp 1 x dp 2 x tp 2" in log, log
    assert "train.sbatch: finished" in log and "requeueing job" not in log, log
    _assert_losses_match(tmp_path / "run", reference, "sbatch 2 nodes x 2 (tp2 x dp2)")
    ckpts = tmp_path / "run" / "checkpoints"
    latest = (ckpts / "latest").read_text().strip()
    assert latest == f"midtrain/step_{MID_STEPS:07d}" and (ckpts / latest).is_dir(), latest
    assert not (tmp_path / "run" / "stopped_by_signal").exists()


def test_sbatch_without_torchrun_ranks_from_slurm(cluster, reference, tmp_path):
    """LAUNCHER=srun: one task per process, no torchrun; each trainer takes its rank, world size and
    local rank from SLURM's own variables (megatron_phi4/launch/env.py)."""
    recipe = write_recipe(tmp_path / "r.yaml", _recipe_tree(tmp_path / "run", tp=2, pp=2))
    job, out = _submit(cluster, tmp_path, recipe, env={"LAUNCHER": "srun"})
    info = cluster.wait_job(job, HANG_GUARD_S)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}\n{cluster.logs()}"
    assert "2 workers per node via srun" in log and "torchrun_node.sh" not in log, log
    assert "parallel layout: world 4 = pp 2 x dp 1 x tp 2" in log, log
    _assert_losses_match(tmp_path / "run", reference, "srun, 4 tasks on 2 nodes (tp2 x pp2)")


def test_preemption_saves_requeues_and_resumes_to_the_same_losses(cluster, reference, tmp_path):
    """Two interruptions of one job: the time limit's B:USR1 warning, then ``scancel --signal=USR1
    -b``. Both reach only the batch shell; each must end in a checkpoint, exit 0 and a requeue."""
    marks = tmp_path / "marks"
    marks.mkdir()
    tree = _recipe_tree(tmp_path / "run", pp=2)
    tree["callbacks"] = [{"type": "tests.ops.holds:HoldUntilStopSignal", "steps": {0: 2, 1: 5},
                          "marker_dir": str(marks)},
                         # the second run's rank 3 (node n2) then dies with SIGABRT on its way out
                         {"type": "tests.ops.holds:AbortOnExit", "restart": 1, "rank": 3}]
    recipe = write_recipe(tmp_path / "r.yaml", tree)
    # 1. time limit: one minute, warning 50 s before it (SLURM checks limits every ~30 s)
    job, out = _submit(cluster, tmp_path, recipe, "--time=1", "--signal=B:USR1@50")
    info = cluster.wait_job(job, HANG_GUARD_S, until=lambda i: i.get("Restarts") == "1" or
                            i.get("JobState") in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"))
    assert info.get("Restarts") == "1", f"{info}\n{out.read_text()}\n{cluster.logs()}"
    # the rest of the run is not under the one-minute limit (the hold below is driven by the test)
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=30")
    log = out.read_text()
    assert "SIGUSR1: asking the workers to save" in log and f"requeueing job {job}" in log, log
    assert "stop requested (SIGUSR1)" in log, log
    # 2. scancel --signal=USR1 -b once every worker is held after global step 5 (midtrain step 1)
    _wait_for(lambda: len(_files(marks, "held.5.")) == 4, "all 4 workers held at step 5", out, cluster)
    cluster.run("scancel", "--signal=USR1", "-b", str(job))
    info = cluster.wait_job(job, HANG_GUARD_S)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", f"{info}\n{log}\n{cluster.logs()}"
    assert log.count("SIGUSR1: asking the workers to save") == 2, log
    assert log.count("stopped on a signal with a checkpoint saved; requeueing") == 2, log
    assert "restart 1)" in log and "restart 2)" in log, log
    # the third run resumed from `latest`, the checkpoint of the stop at midtrain step 1
    assert "(stage midtrain, step 1" in log, log
    runs = log.split("train.sbatch: job ")[1:]
    assert len(runs) == 3, log
    assert runs[0].count("torchrun exited 0") == 2 and runs[2].count("torchrun exited 0") == 2, log
    # the second run: its checkpoint and marker were done when rank 3 aborted, so it was requeued anyway
    assert "torchrun exited 1" in runs[1], runs[1]
    requeued_anyway = rf"requeueing job {job} although a worker failed on its way out \(exit [1-9]\d*\)"
    assert re.search(requeued_anyway, runs[1]), runs[1]
    assert "although a worker failed" not in runs[0] + runs[2], log
    _assert_losses_match(tmp_path / "run", reference, "pre-empted twice (pp2 x dp2)")
    assert not (tmp_path / "run" / "stopped_by_signal").exists()


# ----------------------------------------------------------------------------- torchrun without SLURM
def _torchrun_node(node_rank, addr, port, recipe, log, **env):
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.2:{port}", "--rdzv-id", "phi4-test",
            "--rdzv-conf", f"is_host={1 if node_rank == 0 else 0}", "--local-addr", addr, "--max-restarts", "0",
            "-m", "megatron_phi4.train", "--config", str(recipe)]
    f = open(log, "w")
    p = subprocess.Popen(argv, cwd=REPO, env=_job_env(**env), stdout=f, stderr=subprocess.STDOUT,
                         start_new_session=True)
    f.close()
    return p


def _kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL a launcher and all of its workers (they run in sessions of their own)."""
    for pid in [p.pid] + _descendants(p.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_torchrun_two_nodes_node_loss_and_restart(reference, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    tree = _recipe_tree(tmp_path / "run", tp=2, pp=2)
    tree["callbacks"] = [{"type": "tests.ops.holds:PauseNode", "node": "B", "global_step": 3,
                          "marker_dir": str(marks)}]
    recipe = write_recipe(tmp_path / "r.yaml", tree)
    port = free_port("127.0.0.2")
    procs = [_torchrun_node(0, "127.0.0.2", port, recipe, tmp_path / "a1.log", PHI4_TEST_NODE="A"),
             _torchrun_node(1, "127.0.0.3", port, recipe, tmp_path / "b1.log", PHI4_TEST_NODE="B")]
    try:
        # node B's two workers sit before step 3 (after step 2's checkpoint); A's are inside step 3
        _wait_for(lambda: len(_files(marks, "paused.")) == 2 or any(p.poll() is not None for p in procs),
                  "node B paused before step 3")
        assert all(p.poll() is None for p in procs), (tmp_path / "a1.log").read_text()
        time.sleep(1.0)
        t_kill = time.monotonic()
        _kill_tree(procs[1])
        rc = procs[0].wait(timeout=TIMEOUT_MINUTES * 60 + 120)
        survivor_s = time.monotonic() - t_kill
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_tree(p)
            p.wait(timeout=60)
    a1 = (tmp_path / "a1.log").read_text()
    assert rc != 0, a1
    assert survivor_s < TIMEOUT_MINUTES * 60, f"survivor took {survivor_s:.1f}s to fail\n{a1}"
    # the worker's own one-line reason (train.py), then torchrun's failure summary
    assert "phi4-train: rank" in a1 and "ChildFailedError" in a1, a1
    assert any(s in a1 for s in ("Connection closed by peer", "Connection reset by peer", "DistNetworkError",
                                 "DistBackendError")), a1
    print(f"\nsurvivor exited {rc} {survivor_s:.1f}s after node B was killed")

    # restart both nodes: resume from the step-2 checkpoint and finish like one process
    port = free_port("127.0.0.2")
    procs = [_torchrun_node(0, "127.0.0.2", port, recipe, tmp_path / "a2.log", PHI4_TEST_NODE="A2"),
             _torchrun_node(1, "127.0.0.3", port, recipe, tmp_path / "b2.log", PHI4_TEST_NODE="B2")]
    try:
        rcs = [p.wait(timeout=HANG_GUARD_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_tree(p)
    a2 = (tmp_path / "a2.log").read_text()
    assert rcs == [0, 0], a2 + (tmp_path / "b2.log").read_text()
    assert "(stage pretrain, step 2" in a2, a2
    assert "parallel layout: world 4 = pp 2 x dp 1 x tp 2" in a2, a2
    _assert_losses_match(tmp_path / "run", reference, "torchrun 2 nodes, node lost, restarted (tp2 x pp2)")
    assert not any(_alive(p.pid) for p in procs)
