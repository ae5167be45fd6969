"""Training checkpoints written by every rank: model + optimizer shards, trainer state, RNG, recipe.

Layout (``root`` = ``checkpoint.dir``)::

    root/latest                       relative path of the newest complete checkpoint (moved LAST)
    root/<stage>/step_0000123/
        meta.json                     kind "train", stage, step, consumed_samples, model config with
                                      the stage's RoPE base
        model/                        DCP, global shapes (save_sharded(engine.local_shards()))
        optim/                        DCP, AdamW state (optimizer_shards), absent before the 1st update
        trainer.json                  stage, step, consumed samples per stage, skipped counts,
                                      scheduler state, completed stages, layout
        rng/rank_00000.pt             torch / numpy / python RNG states of each rank
        recipe.yaml                   the resolved recipe

Atomicity: all ranks write into ``root/<stage>/step_XXXXXXX.tmp-*`` (rank 0 creates it and
broadcasts the name); after a barrier rank 0 renames it to its final name and only then rewrites
``latest``. A failure at any point leaves the previous checkpoint as ``latest`` and no partial
directory under a final name. Keep-last-N runs after ``latest`` moved, per stage directory (a
stage's final checkpoint is always its newest one, so it survives for the next stage).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megatron_phi4.checkpoint.format import (
    LATEST_FILE, MODEL_DIR, OPTIM_DIR, TMP_INFIX, CheckpointError, atomic_write_text, make_temp_dir,
    publish_dir, read_meta, resolve_checkpoint, write_meta,
)
from megatron_phi4.checkpoint.sharded import load_optimizer_shards, load_sharded, optimizer_shards, save_sharded

TRAINER_FILE = "trainer.json"
RNG_DIR = "rng"
RECIPE_FILE = "recipe.yaml"
FAULT_ENV = "MEGATRON_PHI4_FAULT"  # test hook, see _fault()
_STEP_RE = re.compile(r"^step_(\d{7,})$")


def _dist() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _fault(name: str, step: int) -> bool:
    """Fault-injection hook for tests: MEGATRON_PHI4_FAULT="crash_after_model_save[=STEP],..." ."""
    for item in os.environ.get(FAULT_ENV, "").split(","):
        key, _, at = item.partition("=")
        if key == name and (not at or int(at) == step):
            return True
    return False


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}/step_{step:07d}"


def layout_of(dims) -> dict:
    return {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp}


def _broadcast_str(s: str | None) -> str:
    if not _dist():
        return s
    obj = [s]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root, engine, optimizer, scheduler, trainer_state: dict, recipe, dims,
                    model_cfg=None) -> Path:
    """Collective: save a complete training checkpoint under ``root`` and point ``latest`` at it.

    ``trainer_state`` must hold at least ``stage`` and ``step``; ``model_cfg`` (default
    ``engine.model_cfg``) is stored in meta.json: pass it with the stage's current rope_theta.
    Returns the final checkpoint path (on every rank).
    """
    root = Path(root)
    stage, step = trainer_state["stage"], int(trainer_state["step"])
    final = root / checkpoint_name(stage, step)
    model_cfg = model_cfg if model_cfg is not None else engine.model_cfg
    tmp = None
    if _rank() == 0:
        if final.exists():  # e.g. a signal right after an interval save of the same step
            shutil.rmtree(final)
        tmp = str(make_temp_dir(final))
    tmp = Path(_broadcast_str(tmp))
    ok = torch.ones(1)
    try:
        save_sharded(engine.local_shards(), tmp / MODEL_DIR)
        if _fault("crash_after_model_save", step):
            raise RuntimeError("injected fault: crash during checkpoint write (after model/)")
        if optimizer is not None and optimizer.state:
            save_sharded(optimizer_shards(optimizer, engine), tmp / OPTIM_DIR)
        (tmp / RNG_DIR).mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / RNG_DIR / f"rank_{_rank():05d}.pt")
        if _rank() == 0:
            state = dict(trainer_state)
            state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
            state["layout"] = layout_of(dims)
            state["world_size"] = dims.world_size
            (tmp / TRAINER_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
            (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            write_meta(tmp, model_cfg, kind="train", stage=stage, step=step,
                       consumed_samples=int(trainer_state.get("consumed_samples", {}).get(stage, 0)),
                       layout=layout_of(dims))
    except BaseException:
        ok.zero_()
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        # Every rank learns whether all ranks succeeded before anything is published.
        if _dist():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() < 1:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint {final}: another rank failed while writing it; "
                              f"{root / LATEST_FILE} still names the previous checkpoint")
    if _rank() == 0:
        publish_dir(tmp, final)
        atomic_write_text(root / LATEST_FILE, checkpoint_name(stage, step) + "\n")
        keep = int(getattr(recipe.checkpoint, "keep_last", 0) or 0)
        if keep > 0:
            prune(root / stage, keep, protect=final)
    _barrier()
    return final


def list_checkpoints(stage_dir) -> list[tuple[int, Path]]:
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    out = []
    for p in stage_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def prune(stage_dir, keep: int, protect: Path | None = None) -> None:
    """Delete all but the newest ``keep`` complete checkpoints of a stage, and stale temp dirs."""
    ckpts = list_checkpoints(stage_dir)
    for _, p in ckpts[:-keep] if keep > 0 else []:
        if protect is not None and p.resolve() == Path(protect).resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(stage_dir).iterdir():
        if TMP_INFIX in p.name and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(root) -> Path | None:
    root = Path(root)
    if not (root / LATEST_FILE).is_file():
        return None
    return resolve_checkpoint(root)


def stage_final_checkpoint(root, stage: str) -> Path | None:
    """The checkpoint that ends ``stage`` (trainer.json has stage_complete), newest first."""
    for _, p in reversed(list_checkpoints(Path(root) / stage)):
        try:
            state = read_trainer_state(p)
        except (OSError, ValueError):
            continue
        if state.get("stage_complete"):
            return p
    return None


def read_trainer_state(path) -> dict:
    path = Path(path)
    f = path / TRAINER_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: not a training checkpoint ({TRAINER_FILE} is missing)")
    return json.loads(f.read_text())


def load_model_only(path, engine) -> dict:
    path = resolve_checkpoint(path)
    load_sharded(engine.local_shards(), path / MODEL_DIR)
    return read_meta(path)


def load_checkpoint(path, engine, optimizer=None, scheduler=None, dims=None, restore_rng: bool = True) -> dict:
    """Collective: load weights (any layout), optimizer state and scheduler; returns trainer state.

    RNG states are restored only when the layout (tp, pp, dp) is identical to the saving run's."""
    path = resolve_checkpoint(path)
    state = read_trainer_state(path)
    load_sharded(engine.local_shards(), path / MODEL_DIR)
    if optimizer is not None:
        if (path / OPTIM_DIR / ".metadata").is_file():
            load_optimizer_shards(optimizer, engine, path / OPTIM_DIR)
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    dims = dims if dims is not None else engine.dims
    same_layout = state.get("layout") == layout_of(dims)
    rng_file = path / RNG_DIR / f"rank_{_rank():05d}.pt"
    state["rng_restored"] = False
    if restore_rng and same_layout and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
        state["rng_restored"] = True
    state["path"] = str(path)
    return state
