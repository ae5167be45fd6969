"""One stage in progress: its optimizer, schedule, data, loss and DPO reference, and its counters.

``StageRun`` is what callbacks see as ``trainer.stage``. ``StageBuilder.start`` /
``StageBuilder.resume`` produce it; the two paths are built to give identical runs:

* starting a stage in the same process as the previous one keeps the previous stage's final
  weights and (with ``reset_optimizer: false``) its Adam moments, but always builds the new
  stage's optimizer from the new stage's config (learning rate, betas, eps *and* weight decay) --
  exactly what a restart does when it loads that stage's final checkpoint;
* resuming inside a stage builds the same objects and fills them from the checkpoint.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_phi4.checkpoint.format import resolve_checkpoint
from megatron_phi4.checkpoint.manager import OptimizerState, load_model_weights_into
from megatron_phi4.training.errors import TrainingError
from megatron_phi4.training.lr_schedule import LRScheduler
from megatron_phi4.training.optimizer import build_optimizer

SEED = "seed"  # init source: initialize from the recipe seed


@dataclass
class StageRun:
    config: Any  # StageConfig
    num_steps: int
    rope_theta: float
    optimizer: Any
    scheduler: LRScheduler
    data: Any  # StageData
    loss_fn: Any
    reference: Any = None  # ReferenceModel for DPO stages, else None
    step: int = 0
    skipped: int = 0
    consecutive_skipped: int = 0
    tokens: int = 0
    complete: bool = False
    started: float = field(default_factory=time.time)
    last_scalars: dict = field(default_factory=dict)
    callbacks: list = field(default_factory=list)  # stage-only callbacks (the recipe's stage.callbacks)

    @property
    def name(self) -> str:
        return self.config.name

    def prepare_batch(self, microbatches: list[dict]) -> None:
        """Complete a batch before the forward pass (the DPO reference log-probs)."""
        if self.reference is not None:
            self.reference.add_log_probs(microbatches)


class ReferenceModel:
    """The frozen DPO reference: the policy's weights at the start of the stage, in a second engine
    of the same layout. Batches that already carry ``ref_chosen_logp`` / ``ref_rejected_logp``
    (precomputed) are left alone."""

    def __init__(self, engine_factory, rope_theta: float):
        self.engine = engine_factory()
        self.engine.set_rope_theta(rope_theta)
        self.engine.eval()
        for p in self.engine.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def copy_from(self, policy) -> None:
        ref = self.engine.local_shards()
        for name, (t, _) in policy.local_shards().items():
            ref[name][0].copy_(t)

    def load(self, path) -> None:
        load_model_weights_into(path, self.engine)

    @torch.no_grad()
    def add_log_probs(self, microbatches: list[dict]) -> None:
        need = [mb for mb in microbatches if "ref_chosen_logp" not in mb or "ref_rejected_logp" not in mb]
        if not need:
            return
        for mb, lp in zip(need, self.engine.sequence_log_probs(need)):
            mb["ref_chosen_logp"], mb["ref_rejected_logp"] = lp.float().chunk(2)


def needs_reference(stage_cfg) -> bool:
    return stage_cfg.loss.type == "dpo"


class StageBuilder:
    """Builds a ``StageRun`` for the trainer (weights, optimizer, schedule, data, reference)."""

    def __init__(self, trainer):
        self.t = trainer
        self.holds: str | None = SEED  # whose weights the engine holds: a stage's final ones, or the seed's
        self.optimizer = None
        self.optimizer_stage: str | None = None

    # ------------------------------------------------------------------ pieces
    def stage_theta(self, stage) -> float:
        """The RoPE base in force in ``stage``: the last one set by it or an earlier stage."""
        theta = self.t.recipe.model.rope_theta
        for s in self.t.recipe.stages:
            if s.rope_theta is not None:
                theta = s.rope_theta
            if s.name == stage.name:
                break
        return float(theta)

    def previous(self, stage):
        names = [s.name for s in self.t.recipe.stages]
        i = names.index(stage.name)
        return self.t.recipe.stages[i - 1] if i > 0 else None

    def init_source(self, stage) -> Path | str:
        """Where the stage's initial weights come from: a checkpoint path or ``SEED``."""
        prev = self.previous(stage)
        if stage.init_from == "none" or (stage.init_from == "previous" and prev is None):
            return SEED
        if stage.init_from == "previous":
            path = self.t.checkpoints.stage_final(prev.name)
            if path is None:
                raise TrainingError(f"stage {stage.name!r} starts from the final weights of {prev.name!r}, but "
                                    f"{self.t.ckpt_root / prev.name} holds no completed checkpoint of it written by "
                                    f"this run; run --stage {prev.name} first (or set stages.{stage.name}.init_from)")
            return path
        return resolve_checkpoint(stage.init_from)

    def _reference(self, stage, source) -> ReferenceModel | None:
        if not needs_reference(stage):
            return None
        if stage.loss.dpo_reference == "precomputed":
            self._check_precomputed(stage, self.init_source(stage) if source == "policy" else source)
            return None
        ref = ReferenceModel(self.t.new_engine, self.stage_theta(stage))
        if source == "policy":
            ref.copy_from(self.t.engine)
        elif source != SEED:
            ref.load(source)
        return ref

    def _check_precomputed(self, stage, init) -> None:
        """Precomputed reference log-probs must come from this stage's initial weights (the
        reference) at this stage's sequence length; refuse them otherwise, naming the file."""
        from megatron_phi4.checkpoint.format import checkpoint_fingerprint
        from megatron_phi4.data.preference import read_ref_logps, ref_logps_path
        from megatron_phi4.data.sources import _as_list

        if init == SEED:
            raise TrainingError(f"stages.{stage.name}.loss.dpo_reference: 'precomputed' needs the stage to start "
                                f"from a checkpoint (the reference model), not from the seed")
        want = checkpoint_fingerprint(init)
        for path in _as_list(stage.data.paths) + _as_list(stage.data.validation):
            _, _, meta = read_ref_logps(path)
            if meta.get("model_fingerprint") != want:
                raise TrainingError(f"{ref_logps_path(path)}: computed with model {meta.get('checkpoint')} "
                                    f"(fingerprint {meta.get('model_fingerprint')}), but stage {stage.name}'s "
                                    f"reference is {init} (fingerprint {want}); recompute them")
            if int(meta.get("seq_length", -1)) != int(stage.data.seq_length):
                raise TrainingError(f"{ref_logps_path(path)}: computed at seq_length {meta.get('seq_length')}, "
                                    f"the stage uses {stage.data.seq_length}; recompute them")
        self.t.log(f"  reference: precomputed log-probs of {init}")

    def _run(self, stage, optimizer, reference) -> StageRun:
        num_steps = stage.num_steps()
        self.optimizer, self.optimizer_stage = optimizer, stage.name
        data = self.t.build_stage_data(stage, num_steps)
        return StageRun(config=stage, num_steps=num_steps, rope_theta=self.stage_theta(stage), optimizer=optimizer,
                        scheduler=LRScheduler(optimizer, stage.optim, num_steps), data=data,
                        loss_fn=self.t.build_loss(stage), reference=reference,
                        callbacks=self.t.build_stage_callbacks(stage))

    # ------------------------------------------------------------------ entry points
    def start(self, stage) -> StageRun:
        """A stage from its beginning (see the module docstring)."""
        t, engine = self.t, self.t.engine
        prev = self.previous(stage)
        if stage.init_from == "previous" and prev is not None and self.holds == prev.name:
            t.log(f"  weights: final weights of stage {prev.name} (in memory)")
        else:
            src = self.init_source(stage)
            if src == SEED:
                if self.holds != SEED:
                    engine._init_from_seed(t.recipe.seed)
                t.log(f"  weights: initialized from seed {t.recipe.seed}")
            else:
                load_model_weights_into(src, engine)
                t.log(f"  weights: {src}")
        self.holds = None
        optimizer = build_optimizer(engine, stage.optim)
        if not stage.reset_optimizer and prev is not None:
            self._carry_moments(stage, prev, optimizer)
        engine.set_rope_theta(self.stage_theta(stage))
        return self._run(stage, optimizer, self._reference(stage, "policy"))

    def _carry_moments(self, stage, prev, optimizer) -> None:
        """Adam moments of the previous stage's end, into the new stage's optimizer."""
        if self.optimizer is not None and self.optimizer_stage == prev.name:
            for p, state in self.optimizer.state.items():  # the same parameter objects
                optimizer.state[p] = {k: v.clone() for k, v in state.items()}
            self.t.log(f"  optimizer: moments of stage {prev.name} (in memory), hyper-parameters of {stage.name}")
            return
        src = self.init_source(stage) if stage.init_from != "previous" else self.t.checkpoints.stage_final(prev.name)
        if isinstance(src, Path) and (src / "optim" / ".metadata").is_file():
            OptimizerState(optimizer, self.t.engine).load(src / "optim")
            self.t.log(f"  optimizer: moments from {src}, hyper-parameters of {stage.name}")

    def resume(self, stage, path) -> tuple[StageRun, dict]:
        """A stage from a checkpoint inside it; returns the run and the checkpoint's trainer state."""
        engine = self.t.engine
        optimizer = build_optimizer(engine, stage.optim)
        engine.set_rope_theta(self.stage_theta(stage))
        # The reference is the stage's *initial* weights, not the checkpoint's.
        run = self._run(stage, optimizer, self._reference(stage, self.init_source(stage)))
        state = self.t.load_checkpoint(path, run)
        self.holds = None
        run.step = int(state["step"])
        run.skipped = int(state.get("skipped_steps", {}).get(stage.name, 0))
        return run, state


def model_cfg_for(recipe, theta: float):
    """The model config a checkpoint of a stage records (with the stage's RoPE base)."""
    return dataclasses.replace(recipe.model, rope_theta=theta)
