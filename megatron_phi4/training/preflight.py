"""Checks of everything a run will read, before anything starts (no process group, no model).

A typo in the SFT data path must not surface after pre-training has run for a week: the entry
point calls ``check_run_inputs`` for every stage the run will execute, and any problem is a
``ConfigError`` (exit status 2) naming the field. The trainer repeats the cheap checkpoint checks
when it is used as a library.
"""
from __future__ import annotations

from pathlib import Path

from megatron_phi4.checkpoint.format import CheckpointError, resolve_checkpoint
from megatron_phi4.checkpoint.manager import has_checkpoints
from megatron_phi4.config import ConfigError


def checkpoint_root(recipe) -> Path:
    return Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else Path(recipe.run_dir) / "checkpoints"


def check_checkpoint_inputs(recipe, root: Path | None = None) -> None:
    """``checkpoint.load`` and every stage's ``init_from`` path exist and are checkpoints; a fresh run
    (``checkpoint.load: none``) does not start in a checkpoint directory that holds another run."""
    root = Path(root) if root is not None else checkpoint_root(recipe)
    load = recipe.checkpoint.load
    if load == "none" and has_checkpoints(root):
        raise ConfigError(
            f"checkpoint.load: 'none' starts a new run, but {root} already holds checkpoints of another run; "
            f"a new run must not mix its checkpoints with them. Resume it (checkpoint.load=auto), or use a new "
            f"run_dir / checkpoint.dir, or delete {root}")
    if load not in ("none", "auto"):
        try:
            resolve_checkpoint(load)
        except CheckpointError as e:
            raise ConfigError(f"checkpoint.load: {e}") from None
    for stage in recipe.stages:
        if stage.init_from not in ("none", "previous"):
            try:
                resolve_checkpoint(stage.init_from)
            except CheckpointError as e:
                raise ConfigError(f"stages.{stage.name}.init_from: {e}") from None


def check_run_inputs(recipe, stage_name: str | None = None) -> None:
    """Everything the run will read: checkpoints (above) and the data of every stage it runs."""
    check_checkpoint_inputs(recipe)
    stages = [recipe.stage(stage_name)] if stage_name is not None else recipe.stages
    problems = []
    for stage in stages:
        problems += _data_problems(stage)
    if problems:
        raise ConfigError("inputs not found or unreadable:\n  " + "\n  ".join(problems))


def _data_problems(stage) -> list[str]:
    try:
        from megatron_phi4.data.preflight import check_stage_data
    except ImportError:  # pragma: no cover - the data package always has it
        return []
    return check_stage_data(stage, f"stages.{stage.name}")
