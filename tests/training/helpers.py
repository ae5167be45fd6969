"""Shared pieces of the trainer tests: a small synthetic recipe, forked or real-entry-point runs,
and readers for what a run leaves behind (metrics.jsonl, ``latest``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.distributed_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
FAULTS = "tests.training.faults:Faults"
HANG_GUARD_S = 3600  # only against hangs of multi-process runs: a busy 2-core machine must never reach it


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


def _train_rank(rank, world, recipe_path, overrides, stage, faults, extra_callbacks):
    import torch

    from megatron_phi4.config import load_recipe
    from megatron_phi4.distributed import init_distributed
    from megatron_phi4.training.trainer import Trainer
    from tests.training.faults import Faults

    torch.set_num_threads(1)
    recipe = load_recipe(recipe_path, overrides, world)
    dims = init_distributed(recipe.parallel, recipe.model)
    callbacks = ([Faults(**faults)] if faults else []) + [cb() for cb in extra_callbacks]
    trainer = Trainer(recipe, dims, callbacks=callbacks)
    summary = trainer.run(stage)
    return {"summary": summary, "callbacks": callbacks} if extra_callbacks else (summary if rank == 0 else None)


def train(recipe_path, world=1, overrides=(), stage=None, faults=None, callbacks=(), timeout=HANG_GUARD_S):
    """Run the trainer on ``world`` forked gloo ranks; returns rank 0's summary (or, with
    ``callbacks`` -- zero-argument factories -- rank 0's summary and callback objects)."""
    return run_distributed(_train_rank, world, recipe_path, list(overrides), stage, faults, list(callbacks),
                           timeout=timeout)[0]


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


def env(**extra):
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **extra})
    return out


def cli(*args):
    return [sys.executable, "-m", "megatron_phi4.train", *args]


def run_cli(*args, env_extra=None, timeout=HANG_GUARD_S):
    return subprocess.run(cli(*args), env=env(**(env_extra or {})), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def wait_for_file(path: Path, proc, what: str, timeout: float = HANG_GUARD_S) -> str:
    """Wait until ``path`` exists (written by the child at a known point); fail if the child exits."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached (hang guard)")
        time.sleep(0.02)
    return path.read_text()
