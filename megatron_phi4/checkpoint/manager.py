"""Training checkpoints of stateful components, written by every rank, published atomically.

A ``CheckpointManager`` saves and loads a list of *components*, each of one kind:

* ``ShardedState`` -- tensors every rank holds a rectangle of (model weights, optimizer moments):
  a DCP directory per component, global shapes, reshardable (``sharded.py``);
* ``JsonState`` -- small state identical on every rank (schedule, data position, trainer
  counters): one entry each in ``trainer.json``, written by rank 0;
* ``PerRankState`` -- state that differs per rank (RNG): one file per rank, restored only when
  the layout is the same.

Layout (``root`` = ``checkpoint.dir``)::

    root/latest                       relative path of the newest complete checkpoint (moved LAST)
    root/<stage>/step_0000123/
        meta.json                     kind "train", stage, step, run_id, model config (stage's RoPE base)
        model/  optim/                sharded components (optim absent before the first update)
        trainer.json                  JSON components by name; the trainer's own keys at top level
        rng/rank_00000.pt             per-rank components
        recipe.yaml                   the resolved recipe

Guarantees:

* Atomic: all ranks write into ``<final>.tmp-*``; after every rank succeeded rank 0 renames it into
  place and only then rewrites ``latest``. A failure anywhere leaves the previous checkpoint as
  ``latest`` and nothing under a final name.
* ``latest`` never names a removed or modified checkpoint: a checkpoint directory is never
  rewritten -- saving a step whose checkpoint already exists in this run is skipped (the state is
  the same: no update happened in between) -- and pruning never touches what ``latest`` names.
* Lineage: every checkpoint records the ``run_id`` of the run that wrote it (a run that resumes
  adopts the id it resumes from). Finding a stage's final checkpoint and pruning only ever look
  at checkpoints of the current lineage, so another run's checkpoints in the same directory are
  never read, pruned or mistaken for this run's.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megatron_phi4.checkpoint.format import (
    LATEST_FILE, MODEL_DIR, OPTIM_DIR, TMP_INFIX, CheckpointError, atomic_write_text, make_temp_dir,
    publish_dir, read_meta, resolve_checkpoint, write_meta,
)
from megatron_phi4.checkpoint.sharded import (
    init_adam_state, load_sharded, optimizer_shards, save_sharded,
)

TRAINER_FILE = "trainer.json"
RNG_DIR = "rng"
RECIPE_FILE = "recipe.yaml"
_STEP_RE = re.compile(r"^step_(\d{7,})$")


def _dist() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _broadcast(obj):
    if not _dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}/step_{step:07d}"


# --------------------------------------------------------------------------- components
class ShardedState(Protocol):
    name: str  # directory inside the checkpoint

    def shards(self) -> dict: ...  # {name: (local tensor, ShardInfo)} to save, or {} for nothing

    def load(self, dcp_dir: Path) -> None: ...


class JsonState(Protocol):
    name: str  # key in trainer.json

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class PerRankState(Protocol):
    name: str  # directory; one file per rank

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class ModelWeights:
    """The engine's weights (any layout; loads under any other)."""

    engine: Any
    name: str = MODEL_DIR
    kind: str = "sharded"

    def shards(self) -> dict:
        return self.engine.local_shards()

    def load(self, dcp_dir: Path) -> None:
        load_sharded(self.engine.local_shards(), dcp_dir)


@dataclass
class OptimizerState:
    """Adam/AdamW moments and step counts, stored per checkpoint name (reshardable). Nothing is
    saved before the first update; loading a checkpoint without it leaves a fresh optimizer."""

    optimizer: Any
    engine: Any
    name: str = OPTIM_DIR
    kind: str = "sharded"

    def shards(self) -> dict:
        return optimizer_shards(self.optimizer, self.engine) if self.optimizer.state else {}

    def load(self, dcp_dir: Path) -> None:
        init_adam_state(self.optimizer)
        load_sharded(optimizer_shards(self.optimizer, self.engine), dcp_dir)


@dataclass
class JsonComponent:
    """Wraps any object with ``state_dict()`` / ``load_state_dict()`` of JSON-able values."""

    name: str
    obj: Any
    kind: str = "json"

    def state_dict(self) -> dict:
        return self.obj.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.obj.load_state_dict(state)


class RNGState:
    """torch / numpy / python (and CUDA) generator states of this rank."""

    name = RNG_DIR
    kind = "per_rank"

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- reading checkpoints
def list_checkpoints(stage_dir) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint directory of a stage, by step."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in stage_dir.iterdir()
                  if (m := _STEP_RE.match(p.name)) and p.is_dir())


def read_trainer_state(path) -> dict:
    f = Path(path) / TRAINER_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: not a training checkpoint ({TRAINER_FILE} is missing)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None


def run_id_of(path) -> str | None:
    try:
        return read_trainer_state(path).get("run_id")
    except CheckpointError:
        return None


def has_checkpoints(root) -> bool:
    """Whether ``root`` holds any training checkpoint (or a ``latest`` pointer)."""
    root = Path(root)
    if (root / LATEST_FILE).exists():
        return True
    return root.is_dir() and any(list_checkpoints(d) for d in root.iterdir() if d.is_dir())


# --------------------------------------------------------------------------- the manager
class CheckpointManager:
    """Saves and loads components under ``root`` for one lineage (``run_id``); see module doc.

    ``on_progress(tmp_dir, component_name)``: called on every rank after each component is written
    (progress reports; tests inject faults here, in the middle of a write).
    """

    def __init__(self, root, *, keep_last: int = 2, run_id: str | None = None,
                 on_progress: Callable[[Path, str], None] | None = None):
        self.root = Path(root)
        self.keep_last = int(keep_last)
        self.run_id = run_id
        self.on_progress = on_progress

    # ----------------------------------------------------------- finding
    def latest(self) -> Path | None:
        """What ``latest`` names (any lineage: resuming from it adopts its lineage)."""
        if not (self.root / LATEST_FILE).is_file():
            return None
        return resolve_checkpoint(self.root)

    def stage_final(self, stage: str) -> Path | None:
        """The checkpoint that ends ``stage`` in this lineage (newest first), or None."""
        for _, p in reversed(list_checkpoints(self.root / stage)):
            try:
                state = read_trainer_state(p)
            except CheckpointError:
                continue
            if state.get("stage_complete") and state.get("run_id") == self.run_id:
                return p
        return None

    # ----------------------------------------------------------- saving
    def save(self, stage: str, step: int, components: list, *, trainer_state: dict, model_cfg, recipe=None,
             layout: dict | None = None) -> Path:
        """Collective: write every component, publish, move ``latest``. Returns the final path (on
        every rank). A checkpoint of this step that already exists in this lineage is kept as is."""
        final = self.root / checkpoint_name(stage, step)
        owner = _broadcast((run_id_of(final) or "an unreadable checkpoint") if _rank() == 0 and final.exists()
                           else None)
        if owner is not None and owner == self.run_id:
            # Saved already at this step (e.g. a stop signal right after an interval save): nothing
            # changed since, and a checkpoint directory is never rewritten.
            if _rank() == 0:
                atomic_write_text(self.root / LATEST_FILE, checkpoint_name(stage, step) + "\n")
            _barrier()
            return final
        if owner is not None:
            raise CheckpointError(f"{final} already exists and belongs to another run ({owner}); "
                                  f"refusing to overwrite it (use another checkpoint.dir)")
        tmp = Path(_broadcast(str(make_temp_dir(final)) if _rank() == 0 else None))
        json_states: dict = {}

        def write_rank0_files():
            if _rank() != 0:
                return
            state = {**json_states, **trainer_state, "stage": stage, "step": int(step), "run_id": self.run_id}
            if layout is not None:
                state["layout"] = layout
            (tmp / TRAINER_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
            if recipe is not None:
                (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            write_meta(tmp, model_cfg, kind="train", stage=stage, step=int(step), run_id=self.run_id, layout=layout)

        # One agreement per part: a rank that fails anywhere meets the others at the next agreement
        # (never inside another part's collectives), and every rank then stops with an error.
        parts = [(comp.name, lambda comp=comp: self._write_component(comp, tmp, json_states)) for comp in components]
        for name, write in parts + [("trainer.json", write_rank0_files)]:
            error = None
            try:
                write()
                if self.on_progress is not None:
                    self.on_progress(tmp, name)
            except BaseException as e:  # noqa: BLE001 -- re-raised below, after the agreement
                error = e
            if not self._all_ok(error is None):
                if _rank() == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                if error is not None:
                    raise error
                raise CheckpointError(f"checkpoint {final}: another rank failed while writing {name}; "
                                      f"{self.root / LATEST_FILE} still names the previous checkpoint")
        if _rank() == 0:
            publish_dir(tmp, final)
            atomic_write_text(self.root / LATEST_FILE, checkpoint_name(stage, step) + "\n")
            self.prune(stage, protect=final)
        _barrier()
        return final

    @staticmethod
    def _write_component(comp, tmp: Path, json_states: dict) -> None:
        if comp.kind == "sharded":
            save_sharded(comp.shards(), tmp / comp.name)
        elif comp.kind == "per_rank":
            (tmp / comp.name).mkdir(exist_ok=True)
            torch.save(comp.state_dict(), tmp / comp.name / f"rank_{_rank():05d}.pt")
        elif comp.kind == "json":
            json_states[comp.name] = comp.state_dict()
        else:
            raise ValueError(f"component {comp.name!r}: unknown kind {comp.kind!r}")

    @staticmethod
    def _all_ok(ok: bool) -> bool:
        flag = torch.tensor([1.0 if ok else 0.0])
        if _dist():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def prune(self, stage: str, protect: Path | None = None) -> None:
        """Keep the newest ``keep_last`` checkpoints of this lineage in ``stage``; never touch another
        lineage's, the protected one, or what ``latest`` names. Stale temp dirs go too."""
        stage_dir = self.root / stage
        keep = {Path(protect).resolve()} if protect is not None else set()
        latest = self.latest() if (self.root / LATEST_FILE).is_file() else None
        if latest is not None:
            keep.add(latest.resolve())
        mine = [p for _, p in list_checkpoints(stage_dir) if run_id_of(p) == self.run_id]
        for p in mine[:-self.keep_last] if self.keep_last > 0 else []:
            if p.resolve() not in keep:
                shutil.rmtree(p, ignore_errors=True)
        for p in stage_dir.iterdir() if stage_dir.is_dir() else []:
            if TMP_INFIX in p.name and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # ----------------------------------------------------------- loading
    def load(self, path, components: list, *, layout: dict | None = None) -> dict:
        """Collective: fill every component from ``path``; returns the trainer state (trainer.json)
        with ``rng_restored``. Per-rank state is restored only under the saving run's layout."""
        path = resolve_checkpoint(path)
        state = read_trainer_state(path)
        same_layout = layout is not None and state.get("layout") == layout
        state["rng_restored"] = False
        for comp in components:
            if comp.kind == "sharded":
                if (path / comp.name / ".metadata").is_file():
                    comp.load(path / comp.name)
            elif comp.kind == "json":
                if comp.name in state:
                    comp.load_state_dict(state[comp.name])
            elif comp.kind == "per_rank":
                f = path / comp.name / f"rank_{_rank():05d}.pt"
                if same_layout and f.is_file():
                    comp.load_state_dict(torch.load(f, weights_only=False))
                    state["rng_restored"] = True
        state["path"] = str(path)
        return state


def load_model_weights_into(path, engine) -> dict:
    """Load only the weights of a checkpoint (any kind, any layout) into ``engine``; returns meta."""
    path = resolve_checkpoint(path)
    ModelWeights(engine).load(path / MODEL_DIR)
    return read_meta(path)
