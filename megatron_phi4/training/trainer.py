"""The multi-stage trainer: pre-train -> mid-train -> SFT -> DPO rounds, resumable at any step.

``Trainer(recipe, dims).run(stage_name=None)``

* without a stage: continue from wherever the run stands -- the latest checkpoint (stage, step,
  data position, optimizer, schedule, RNG) -- then run the remaining stages in order;
* with ``stage_name``: run only that stage (resuming it if the latest checkpoint is inside it,
  otherwise starting it from the previous stage's final checkpoint when ``init_from: previous``).

The loop is thin: a stage is set up (``stage.py``), then each step takes a global batch, runs
forward/backward and clipping through the engine, and updates unless a callback vetoed it; all
else -- the non-finite-step policy, metrics, evaluation, stop signals, checkpointing, and anything
a recipe adds -- are callbacks (``callbacks/``). Checkpoints go through a ``CheckpointManager`` over
the run's stateful components (model, optimizer, schedule, data position, trainer state, RNG).
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_phi4.checkpoint.manager import (
    CheckpointManager, JsonComponent, ModelWeights, OptimizerState, RNGState, read_trainer_state,
)
from megatron_phi4.checkpoint.format import resolve_checkpoint
from megatron_phi4.engine import ParallelEngine
from megatron_phi4.losses import build_loss
from megatron_phi4.training.callbacks import CallbackList, build_run_callbacks, build_stage_callbacks
from megatron_phi4.training.errors import TrainingError
from megatron_phi4.training.stage import StageBuilder, StageRun, model_cfg_for

__all__ = ["Trainer", "TrainingError", "StepResult"]

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """One optimizer step as callbacks see it."""

    step: int  # of the stage, 1-based
    global_step: int  # of the run
    loss: float
    metrics: dict
    microbatches: list
    grad_norm: float = float("nan")
    lr: float = 0.0
    tokens: int = 0  # tokens of the global batch (all DP ranks)
    step_time: float = 0.0
    skip_update: bool = False  # set by a callback in pre_optim_step to drop this step's update


@dataclass
class StopRequest:
    reason: str
    save: bool = True
    by_signal: bool = False  # a scheduler's signal (the job should be requeued), not a callback's decision


@dataclass
class RunState:
    """Run-wide counters (saved in every checkpoint)."""

    run_id: str | None = None
    completed_stages: list = field(default_factory=list)
    consumed_samples: dict = field(default_factory=dict)
    skipped_steps: dict = field(default_factory=dict)
    global_step: int = 0


class Trainer:
    def __init__(self, recipe, dims, run_dir: str | os.PathLike | None = None, callbacks: list | None = None):
        self.recipe, self.dims = recipe, dims
        self.run_dir = Path(run_dir if run_dir is not None else recipe.run_dir)
        self.ckpt_root = Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else self.run_dir / "checkpoints"
        self.is_main = dims.rank == 0
        torch.manual_seed(recipe.seed)
        self.engine = self.new_engine()
        self.checkpoints = CheckpointManager(self.ckpt_root, keep_last=recipe.checkpoint.keep_last,
                                             on_progress=lambda tmp, name: self.callbacks.checkpoint_progress(
                                                 self, tmp, name))
        self.run_callbacks = build_run_callbacks(recipe) + list(callbacks or [])
        self.state = RunState()
        self.stage: StageRun | None = None
        self.stop_requested: StopRequest | None = None
        self.summary: dict = {"stages": {}}
        self.stages = StageBuilder(self)

    # ------------------------------------------------------------------ helpers for callbacks and stages
    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    @property
    def callbacks(self) -> CallbackList:
        """The run's callbacks, then the running stage's own."""
        return CallbackList(self.run_callbacks + (self.stage.callbacks if self.stage is not None else []))

    def new_engine(self) -> ParallelEngine:
        return ParallelEngine(self.recipe.model, self.recipe.parallel, self.dims, seed=self.recipe.seed)

    def request_stop(self, reason: str, save: bool = True, by_signal: bool = False) -> None:
        """Stop after the current step (every rank must call it at the same step)."""
        self.stop_requested = StopRequest(reason, save, by_signal)

    def data_cache_dir(self, stage) -> str:
        """Index caches default to the run directory, so each rank memory-maps one build."""
        return stage.data.cache_dir or str(self.run_dir / "data_cache")

    def build_stage_data(self, stage, num_steps: int):
        from megatron_phi4.data.stage import build_stage_data

        return build_stage_data(stage, dp_rank=self.dims.dp_rank, dp_size=self.dims.dp, consumed_samples=0,
                                num_steps=num_steps, vocab_size=self.recipe.model.vocab_size,
                                cache_dir=self.data_cache_dir(stage))

    def build_validation_data(self, stage):
        from megatron_phi4.data.stage import build_validation_data

        return build_validation_data(stage, dp_rank=self.dims.dp_rank, dp_size=self.dims.dp,
                                     vocab_size=self.recipe.model.vocab_size, cache_dir=self.data_cache_dir(stage))

    def build_loss(self, stage):
        return build_loss(stage.loss)

    def build_stage_callbacks(self, stage) -> list:
        return build_stage_callbacks(stage)

    # ------------------------------------------------------------------ checkpoints
    def _components(self, run: StageRun) -> list:
        return [ModelWeights(self.engine), OptimizerState(run.optimizer, self.engine),
                JsonComponent("scheduler", run.scheduler), JsonComponent("data", run.data),
                JsonComponent("callbacks", CallbackList(self.run_callbacks + run.callbacks)), RNGState()]

    def _layout(self) -> dict:
        return {"tp": self.dims.tp, "pp": self.dims.pp, "dp": self.dims.dp}

    def save_checkpoint(self) -> Path:
        """Collective: checkpoint the running stage at its current step."""
        run = self.stage
        self.state.consumed_samples[run.name] = run.data.consumed_samples
        self.state.skipped_steps[run.name] = run.skipped
        trainer_state = {"completed_stages": list(self.state.completed_stages),
                         "consumed_samples": dict(self.state.consumed_samples),
                         "skipped_steps": dict(self.state.skipped_steps), "global_step": self.state.global_step,
                         "stage_complete": run.complete, "num_steps": run.num_steps, "rope_theta": run.rope_theta}
        self.callbacks.pre_checkpoint(self, run.name, run.step)
        t0 = time.time()
        path = self.checkpoints.save(run.name, run.step, self._components(run), trainer_state=trainer_state,
                                     model_cfg=model_cfg_for(self.recipe, run.rope_theta), recipe=self.recipe,
                                     layout=self._layout())
        self.log(f"  checkpoint {path} ({time.time() - t0:.1f}s)")
        self.callbacks.post_checkpoint(self, path)
        return path

    def load_checkpoint(self, path, run: StageRun) -> dict:
        state = self.checkpoints.load(path, self._components(run), layout=self._layout())
        self.log(f"  loaded {state['path']} (weights, optimizer, schedule, data position"
                 f"{', RNG' if state['rng_restored'] else ''})")
        return state

    # ------------------------------------------------------------------ running
    def run(self, stage_name: str | None = None) -> dict:
        from megatron_phi4.training.preflight import check_checkpoint_inputs

        check_checkpoint_inputs(self.recipe, self.ckpt_root)
        self.callbacks.pre_run(self)
        try:
            return self._run(stage_name)
        except BaseException as e:
            self.callbacks.on_error(self, e)
            raise
        finally:
            self.callbacks.post_run(self)

    def _resume_point(self):
        load = self.recipe.checkpoint.load
        if load == "none":
            return None
        return self.checkpoints.latest() if load == "auto" else resolve_checkpoint(load)

    def _run(self, stage_name):
        resume = self._resume_point()
        rstate = read_trainer_state(resume) if resume is not None else None
        if rstate is not None:
            for k in ("completed_stages", "consumed_samples", "skipped_steps", "global_step"):
                if k in rstate:
                    setattr(self.state, k, rstate[k])
            self.state.run_id = rstate.get("run_id") or f"legacy-{uuid.uuid4().hex[:8]}"
            self.log(f"resuming from {resume} (stage {rstate['stage']}, step {rstate['step']}"
                     f"{', stage complete' if rstate.get('stage_complete') else ''}; run {self.state.run_id})")
        else:
            self.state.run_id = self._new_run_id()
        self.checkpoints.run_id = self.state.run_id
        if stage_name is not None:
            stages = [self.recipe.stage(stage_name)]
        else:
            stages = [s for s in self.recipe.stages if s.name not in self.state.completed_stages]
        t0 = time.time()
        self.summary.update(stopped_by_signal=False, resumed_from=str(resume) if resume else None,
                            run_dir=str(self.run_dir), checkpoints=str(self.ckpt_root), run_id=self.state.run_id)
        for stage in stages:
            if self.stop_requested is not None:  # e.g. a callback's decision in the previous stage's post_stage
                self.log(f"stopping before stage {stage.name}: {self.stop_requested.reason}")
                break
            here = rstate is not None and rstate["stage"] == stage.name
            if here and rstate.get("stage_complete"):
                self.log(f"stage {stage.name}: already complete in {resume}; nothing to do")
                continue
            if self._run_stage(stage, resume if here else None):
                break
        if self.stop_requested is not None:
            self.summary["stop_reason"] = self.stop_requested.reason
            self.summary["stopped_by_signal"] = self.stop_requested.by_signal
        self.summary["wall_s"] = time.time() - t0
        self.summary["global_step"] = self.state.global_step
        return self.summary

    def _new_run_id(self) -> str:
        rid = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}" if self.is_main else None
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [rid]
            dist.broadcast_object_list(box, src=0)
            rid = box[0]
        return rid

    def _run_stage(self, stage, resume) -> bool:
        """Set up, step until done or stopped, finish. Returns True when stopped early."""
        d = stage.data
        self.log(f"=== stage {stage.name}: {stage.num_steps()} steps, seq {d.seq_length}, global batch "
                 f"{d.global_batch_size} (micro {d.micro_batch_size} x dp {self.dims.dp}), lr {stage.optim.lr:g} "
                 f"({stage.optim.decay_style}, warm-up {stage.optim.warmup_steps}), rope_theta "
                 f"{self.stages.stage_theta(stage):g}, loss {stage.loss.type}, data {d.kind}")
        if resume is not None:
            self.stage, _ = self.stages.resume(stage, resume)
        else:
            self.stage = self.stages.start(stage)
        run = self.stage
        self.callbacks.pre_stage(self)
        while run.step < run.num_steps and self.stop_requested is None:
            self.callbacks.pre_step(self)
            result = self.train_step()
            self.callbacks.post_step(self, result)
        stopped = self.stop_requested is not None
        if not stopped:
            run.complete = True
            self.state.completed_stages = list(dict.fromkeys(self.state.completed_stages + [stage.name]))
            self.callbacks.post_stage(self)
            self.stages.holds = stage.name
        wall = time.time() - run.started
        self.summary["stages"][stage.name] = {"steps": run.step, "skipped": run.skipped, "tokens": run.tokens,
                                              "tokens_per_s": run.tokens / max(wall, 1e-9), "wall_s": wall,
                                              **run.last_scalars, **({"stopped": self.stop_requested.reason} if stopped else {})}
        if stopped:
            self.log(f"  stopped cleanly at stage {stage.name} step {run.step} ({self.stop_requested.reason})")
        self.stage = None
        return stopped

    def train_step(self) -> StepResult:
        """One optimizer step of the running stage (every rank)."""
        run, engine = self.stage, self.engine
        t0 = time.perf_counter()
        mbs = run.data.next_global_batch()
        run.prepare_batch(mbs)
        units = engine.global_units(mbs, run.loss_fn)
        out = engine.forward_backward(mbs, run.loss_fn, units)
        result = StepResult(step=run.step + 1, global_step=self.state.global_step + 1, loss=out["loss"],
                            metrics=out.get("metrics", {}), microbatches=mbs)
        self.callbacks.post_backward(self, result)
        result.grad_norm = engine.clip_grad_norm_(run.config.optim.clip_grad)
        result.lr = run.scheduler.get_lr()
        self.callbacks.pre_optim_step(self, result)
        if not result.skip_update:
            run.optimizer.step()
            run.scheduler.step()
        engine.zero_grad()
        run.step += 1
        self.state.global_step += 1
        result.tokens = self._global_tokens(mbs)
        run.tokens += result.tokens
        result.step_time = time.perf_counter() - t0
        return result

    def _global_tokens(self, mbs) -> int:
        n = sum(int(mb["input_ids"].numel()) for mb in mbs)
        if dist.is_initialized() and self.dims.dp > 1:
            t = torch.tensor([float(n)], device=self.engine.device)
            dist.all_reduce(t, group=self.dims.dp_group)
            n = int(t.item())
        return n
