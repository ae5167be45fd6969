"""Pre-train and SFT a tiny Phi-4 on the arithmetic task, on CPU, with the project's trainer.

:func:`train_arithmetic_model` writes the task's data (:mod:`~megatron_phi4.demo.arithmetic_data`),
writes a recipe (:func:`arithmetic_recipe`: a tiny Phi-4 body on the trimmed vocabulary, a
``pretrain`` stage on the plain-text corpus and an ``sft`` stage on the chat conversations with
assistant-only loss) and runs ``Trainer(recipe, dims).run()``. It returns the final checkpoint of
each stage and the vocabulary map (also saved as ``vocab.json`` beside the checkpoints).

Re-running with the same ``work_dir`` resumes: the data are reused and the trainer continues
from its latest checkpoint, so a finished run returns at once and an interrupted one loses at most
the steps since its last checkpoint.

The defaults are sized for two busy CPU cores (see docs/demo.md for the measured wall time and
held-out accuracy): the SFT model gets a useful fraction of held-out problems right -- neither
none (nothing for Pivotal Token Search to find) nor all (no room for DPO to improve).
"""
from __future__ import annotations

import copy
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from megatron_phi4.demo.arithmetic import DEFAULT_TASK, TaskSpec
from megatron_phi4.demo.arithmetic_data import ArithmeticData, DataSizes, write_arithmetic_data
from megatron_phi4.demo.trimmed_vocab import VOCAB_FILE, TrimmedVocab
from megatron_phi4.fileio import atomic_write_text

__all__ = ["ArithmeticModel", "arithmetic_recipe", "train_arithmetic_model", "run_recipe_stages", "DEFAULT_MODEL",
           "DEFAULT_PRETRAIN_STEPS", "DEFAULT_SFT_STEPS"]

# A tiny Phi-4 body: same shape rules as the release (GQA 2:1, SwiGLU, RMSNorm, RoPE, untied head).
DEFAULT_MODEL: Dict = dict(hidden_size=128, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                           intermediate_size=384, max_seq_length=1024, rope_theta=10000.0, init_std=0.02)
DEFAULT_PRETRAIN_STEPS = 400
DEFAULT_SFT_STEPS = 700


@dataclass
class ArithmeticModel:
    """What :func:`train_arithmetic_model` produced."""
    work_dir: str
    run_dir: str
    recipe_path: str
    pretrain_checkpoint: str
    sft_checkpoint: str
    vocab: TrimmedVocab
    vocab_path: str                # beside the checkpoints (run_dir/vocab.json)
    data: ArithmeticData
    wall_s: float                  # this call (data + training; ~0 when everything was reused)
    summary: dict = field(default_factory=dict)


def arithmetic_recipe(data: ArithmeticData, vocab: TrimmedVocab, run_dir: str, *, seed: int = 1234,
                      pretrain_steps: int = DEFAULT_PRETRAIN_STEPS, sft_steps: int = DEFAULT_SFT_STEPS,
                      model: Optional[Dict] = None, pretrain_lr: float = 3e-3, sft_lr: float = 2e-3,
                      pretrain_batch: int = 16, sft_batch: int = 8, micro_batch: int = 8,
                      pretrain_seq: int = 256, sft_seq: int = 512) -> dict:
    """The recipe tree (load it with ``megatron_phi4.config.load_recipe`` after writing it as YAML,
    or append post-training stages to ``tree["stages"]`` first). Every data section carries the
    trimmed ``pad_id``/``eod_id``; ``model.vocab_size`` is the map's row count."""
    body = dict(DEFAULT_MODEL, **(model or {}))
    body["vocab_size"] = vocab.vocab_size
    ids = {"pad_id": vocab.pad_id, "eod_id": vocab.eod_id}
    mbs_pre, mbs_sft = min(micro_batch, pretrain_batch), min(micro_batch, sft_batch)
    return {
        "name": "arithmetic_demo",
        "run_dir": str(run_dir),
        "seed": int(seed),
        "model": body,
        "parallel": {"tp": 1, "pp": 1, "dp": -1},
        "checkpoint": {"interval": 100, "keep_last": 2},
        "logging": {"log_interval": 50, "tensorboard": False},
        "stages": [
            {"name": "pretrain", "train_steps": int(pretrain_steps), "eval_interval": int(pretrain_steps),
             "eval_iters": 2,
             "data": {"kind": "pretrain", "mixture": data.pretrain_mixture,
                      "validation": data.pretrain_validation, "seq_length": pretrain_seq,
                      "micro_batch_size": mbs_pre, "global_batch_size": pretrain_batch, "seed": seed, **ids},
             "optim": {"lr": pretrain_lr, "min_lr": pretrain_lr / 10, "weight_decay": 0.1,
                       "warmup_steps": max(1, pretrain_steps // 20), "decay_style": "cosine",
                       "clip_grad": 1.0}},
            {"name": "sft", "train_steps": int(sft_steps), "eval_interval": int(sft_steps), "eval_iters": 2,
             "data": {"kind": "sft", "paths": [data.sft_train], "validation": data.sft_valid,
                      "seq_length": sft_seq, "micro_batch_size": mbs_sft, "global_batch_size": sft_batch,
                      "seed": seed, **ids},
             "optim": {"lr": sft_lr, "min_lr": sft_lr / 10, "weight_decay": 0.0,
                       "warmup_steps": max(1, sft_steps // 20), "decay_style": "cosine", "clip_grad": 1.0}},
        ],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env() -> None:
    """The rendezvous variables of a one-process group (kept where already set, e.g. by torchrun)."""
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())),
                 ("WORLD_SIZE", "1"), ("RANK", "0")):
        os.environ.setdefault(k, v)


def run_recipe_stages(tree: dict) -> dict:
    """Run a recipe tree with the project's Trainer in this process (inside an initialized process
    group, or in a one-process gloo group created and destroyed here); resumes from the run's
    latest checkpoint. Returns the trainer's summary."""
    import torch.distributed as dist

    from megatron_phi4.distributed import init_distributed
    from megatron_phi4.training.trainer import Trainer

    created = not dist.is_initialized()
    if created:
        set_single_process_env()
    world = int(os.environ.get("WORLD_SIZE", 1)) if created else dist.get_world_size()
    recipe = _recipe_from_tree(tree, world)
    dims = init_distributed(recipe.parallel, recipe.model)
    try:
        return Trainer(recipe, dims).run()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def train_arithmetic_model(work_dir: str | os.PathLike, *, seed: int = 1234,
                           pretrain_steps: int = DEFAULT_PRETRAIN_STEPS,
                           sft_steps: int = DEFAULT_SFT_STEPS, model: Optional[Dict] = None,
                           sizes: DataSizes = DataSizes(), spec: TaskSpec = DEFAULT_TASK,
                           recipe_overrides: Optional[Dict] = None, log=print) -> ArithmeticModel:
    """Write the data and the recipe under ``work_dir`` and run its pretrain and SFT stages.

    ``work_dir/data`` holds the data (:func:`write_arithmetic_data`), ``work_dir/run`` the run
    (``recipe.yaml``, ``vocab.json``, ``checkpoints/``, ``metrics.jsonl``). ``model``: overrides of
    :data:`DEFAULT_MODEL`; ``recipe_overrides``: keyword arguments of :func:`arithmetic_recipe`.
    Runs in this process: inside an initialized process group (e.g. under ``torchrun``, the
    recipe's data parallelism spreads over it), or else in a one-process gloo group it creates
    and destroys."""
    import torch.distributed as dist
    import yaml

    from megatron_phi4.distributed import init_distributed
    from megatron_phi4.training.trainer import Trainer

    t0 = time.time()
    work = Path(work_dir).resolve()
    run_dir = work / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    data = write_arithmetic_data(str(work / "data"), seed=seed, sizes=sizes, spec=spec, log=log)
    vocab = data.vocab()
    tree = arithmetic_recipe(data, vocab, str(run_dir), seed=seed, pretrain_steps=pretrain_steps,
                             sft_steps=sft_steps, model=model, **(recipe_overrides or {}))
    recipe_path = run_dir / "recipe.yaml"
    if recipe_path.is_file() and yaml.safe_load(recipe_path.read_text()) != json.loads(json.dumps(tree)):
        raise ValueError(f"{recipe_path}: {work} holds a run with another recipe (other steps, model or "
                         "data); use another work_dir or delete it")
    created = not dist.is_initialized()
    if created:
        set_single_process_env()
    world = int(os.environ.get("WORLD_SIZE", 1)) if created else dist.get_world_size()
    rank = int(os.environ.get("RANK", 0)) if created else dist.get_rank()
    if rank == 0:
        atomic_write_text(recipe_path, yaml.safe_dump(tree, sort_keys=False))
        vocab.save(run_dir / VOCAB_FILE)
    recipe = _recipe_from_tree(tree, world)
    ckpt_root = run_dir / "checkpoints"
    pre, sft = _final_checkpoints(ckpt_root)
    done = pre is not None and sft is not None
    summary: dict = {}
    if not done:
        dims = init_distributed(recipe.parallel, recipe.model)
        try:
            summary = Trainer(recipe, dims).run()
        finally:
            if created and dist.is_initialized():
                dist.destroy_process_group()
        pre, sft = _final_checkpoints(ckpt_root)
    if pre is None or sft is None:
        raise RuntimeError(f"{run_dir}: training stopped before both stages completed "
                           f"(pretrain: {pre}, sft: {sft}); call again to resume")
    wall = time.time() - t0
    if rank == 0 and not done:
        log(f"[arithmetic] trained in {wall:.0f}s: pretrain {pretrain_steps} steps, sft {sft_steps} "
            f"steps; vocabulary {vocab.num_used} ids ({vocab.vocab_size} rows)")
    return ArithmeticModel(work_dir=str(work), run_dir=str(run_dir), recipe_path=str(recipe_path),
                           pretrain_checkpoint=str(pre), sft_checkpoint=str(sft), vocab=vocab,
                           vocab_path=str(run_dir / VOCAB_FILE), data=data, wall_s=wall, summary=summary)


def _final_checkpoints(ckpt_root: Path):
    """(pretrain, sft) final checkpoints of the lineage ``latest`` belongs to (None when missing):
    the checkpoint manager only trusts checkpoints of one run's lineage."""
    from megatron_phi4.checkpoint.manager import CheckpointManager, has_checkpoints, read_trainer_state

    if not has_checkpoints(ckpt_root):
        return None, None
    latest = CheckpointManager(ckpt_root).latest()
    if latest is None:
        return None, None
    manager = CheckpointManager(ckpt_root, run_id=read_trainer_state(latest).get("run_id"))
    return manager.stage_final("pretrain"), manager.stage_final("sft")


def _recipe_from_tree(tree: dict, world: int):
    from megatron_phi4.config import RecipeConfig, from_dict
    return from_dict(RecipeConfig, copy.deepcopy(tree)).validate(world)
