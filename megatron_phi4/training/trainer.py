"""The multi-stage training loop: pre-train -> mid-train -> SFT -> DPO rounds, resumable at any step.

``Trainer(recipe, dims).run(stage_name=None)``

* without a stage: continue from wherever the run stands -- the latest checkpoint (stage, step,
  consumed samples, optimizer, schedule, RNG) -- then run the remaining stages in order;
* with ``stage_name``: run only that stage (resuming it if the latest checkpoint is inside it,
  otherwise starting it from the previous stage's final checkpoint when ``init_from: previous``).

One step: ``mbs = data.next_global_batch()`` (this DP rank's micro-batches), ``units =
engine.global_units``, ``engine.forward_backward``, ``engine.clip_grad_norm_``; a non-finite loss or
gradient norm zeroes the gradients and skips the update (counted; ``max_skipped_steps`` in a row
stops the run with ``TrainingError``); otherwise ``optimizer.step()`` and ``scheduler.step()``.
After each step every rank agrees (all-reduce) whether a SIGTERM/SIGUSR1 arrived; if so a checkpoint
is saved and ``run`` returns with ``stopped_by_signal``.

DPO stages: the reference log-probs come from a frozen second engine holding the stage's initial
weights (the init checkpoint, reloaded on resume), unless the batch already carries
``ref_chosen_logp`` / ``ref_rejected_logp``.

Test hooks (environment variable ``MEGATRON_PHI4_FAULT``, comma separated):
``exit_after_step=N`` (os._exit(137) after global step N of the run, after its checkpoint),
``exit_after_step=N@RANK`` (only that rank), ``nan_at_step=N[:M]`` (poison gradients of steps N..M),
``step_sleep=SECONDS`` (slow every step down), ``crash_after_model_save[=STEP]`` (see
checkpoint/distributed.py).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_phi4.checkpoint.distributed import (
    FAULT_ENV, latest_checkpoint, load_checkpoint, load_model_only, read_trainer_state, save_checkpoint,
    stage_final_checkpoint,
)
from megatron_phi4.checkpoint.format import resolve_checkpoint
from megatron_phi4.checkpoint.sharded import load_optimizer_shards
from megatron_phi4.distributed.engine import ParallelEngine
from megatron_phi4.losses import build_loss
from megatron_phi4.training.lr_schedule import LRScheduler
from megatron_phi4.training.metrics import MetricsLogger, default_peak_tflops, memory_metrics, throughput_metrics
from megatron_phi4.training.optimizer import build_optimizer
from megatron_phi4.training.signals import StopSignal


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row)."""


def _fault_value(key: str) -> str | None:
    for item in os.environ.get(FAULT_ENV, "").split(","):
        if item.startswith(key + "="):
            return item.split("=", 1)[1]
    return None


def _is_dpo(stage) -> bool:
    return stage.loss.type == "dpo"


class Trainer:
    def __init__(self, recipe, dims, run_dir: str | os.PathLike | None = None):
        self.recipe, self.dims = recipe, dims
        self.run_dir = Path(run_dir if run_dir is not None else recipe.run_dir)
        self.ckpt_root = Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else self.run_dir / "checkpoints"
        self.is_main = dims.rank == 0
        torch.manual_seed(recipe.seed)
        self.engine = ParallelEngine(recipe.model, recipe.parallel, dims, seed=recipe.seed)
        lg = recipe.logging
        self.metrics = MetricsLogger(self.run_dir, enabled=self.is_main, tensorboard=lg.tensorboard,
                                     jsonl=lg.metrics_jsonl, log_interval=lg.log_interval)
        self.peak_tflops = lg.peak_tflops or default_peak_tflops(dims.device)
        self.signal = StopSignal()
        self.optimizer = None
        self.optimizer_stage = None
        self.state = {"completed_stages": [], "consumed_samples": {}, "skipped_steps": {}, "global_step": 0}
        self._holds: str | None = "__seed__"  # whose weights the engine holds: a stage's final ones, or init
        self.summary: dict = {"stages": {}}
        self._val_cache: dict = {}

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def stage_theta(self, stage) -> float:
        """The RoPE base in force in ``stage``: the last one set by it or an earlier stage."""
        theta = self.recipe.model.rope_theta
        for s in self.recipe.stages:
            if s.rope_theta is not None:
                theta = s.rope_theta
            if s.name == stage.name:
                break
        return float(theta)

    def _prev_stage(self, stage):
        names = [s.name for s in self.recipe.stages]
        i = names.index(stage.name)
        return self.recipe.stages[i - 1] if i > 0 else None

    def _model_cfg_for(self, stage):
        return dataclasses.replace(self.recipe.model, rope_theta=self.stage_theta(stage))

    def _build_data(self, stage, consumed: int, num_steps: int):
        from megatron_phi4.data.stage import build_stage_data

        return build_stage_data(stage, dp_rank=self.dims.dp_rank, dp_size=self.dims.dp,
                                consumed_samples=consumed, num_steps=num_steps,
                                vocab_size=self.recipe.model.vocab_size)

    def _build_validation(self, stage):
        from megatron_phi4.data.stage import build_validation_data

        return build_validation_data(stage, dp_rank=self.dims.dp_rank, dp_size=self.dims.dp,
                                     vocab_size=self.recipe.model.vocab_size)

    # ------------------------------------------------------------------ DPO reference
    def _init_source(self, stage) -> Path | str | None:
        """Where the stage's initial weights come from: a checkpoint path, "seed", or None (keep)."""
        if stage.init_from == "none":
            return "seed"
        if stage.init_from == "previous":
            prev = self._prev_stage(stage)
            if prev is None:
                return "seed"
            path = stage_final_checkpoint(self.ckpt_root, prev.name)
            if path is None:
                raise TrainingError(f"stage {stage.name!r} starts from the final weights of {prev.name!r}, but "
                                    f"{self.ckpt_root / prev.name} holds no completed checkpoint of it; run "
                                    f"--stage {prev.name} first (or set stages.{stage.name}.init_from)")
            return path
        return resolve_checkpoint(stage.init_from)

    def _build_reference(self, stage):
        src = self._init_source(stage)
        ref = ParallelEngine(self.recipe.model, self.recipe.parallel, self.dims, seed=self.recipe.seed)
        if src != "seed":
            load_model_only(src, ref)
        ref.set_rope_theta(self.stage_theta(stage))
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _add_reference_logps(self, mbs, ref) -> None:
        need = [mb for mb in mbs if "ref_chosen_logp" not in mb or "ref_rejected_logp" not in mb]
        if not need:
            return
        if ref is None:
            raise TrainingError("DPO batch without ref_*_logp and no reference model")
        with torch.no_grad():
            logps = ref.sequence_log_probs(need)
        for mb, lp in zip(need, logps):
            chosen, rejected = lp.float().chunk(2)
            mb["ref_chosen_logp"], mb["ref_rejected_logp"] = chosen, rejected

    # ------------------------------------------------------------------ running
    def run(self, stage_name: str | None = None) -> dict:
        self.signal.install()
        try:
            return self._run(stage_name)
        finally:
            self.signal.restore()
            self.metrics.close()

    def _resume_point(self):
        load = self.recipe.checkpoint.load
        if load == "none":
            return None, None
        path = latest_checkpoint(self.ckpt_root) if load == "auto" else resolve_checkpoint(load)
        if path is None:
            return None, None
        return path, read_trainer_state(path)

    def _run(self, stage_name):
        resume, rstate = self._resume_point()
        if rstate is not None:
            for k in ("completed_stages", "consumed_samples", "skipped_steps", "global_step"):
                if k in rstate:
                    self.state[k] = rstate[k]
            self.log(f"resuming from {resume} (stage {rstate['stage']}, step {rstate['step']}"
                     f"{', stage complete' if rstate.get('stage_complete') else ''})")
        if stage_name is not None:
            stages = [self.recipe.stage(stage_name)]
        else:
            stages = [s for s in self.recipe.stages if s.name not in self.state["completed_stages"]]
        t0 = time.time()
        self.summary.update(stopped_by_signal=False, resumed_from=str(resume) if resume else None)
        for stage in stages:
            here = rstate is not None and rstate["stage"] == stage.name
            if here and rstate.get("stage_complete"):
                self.log(f"stage {stage.name}: already complete in {resume}; nothing to do")
                continue
            # A complete previous stage that is in the latest checkpoint is what the engine should hold.
            stopped = self._run_stage(stage, resume if here else None)
            if stopped:
                self.summary["stopped_by_signal"] = True
                break
        self.summary["wall_s"] = time.time() - t0
        self.summary["global_step"] = self.state["global_step"]
        return self.summary

    def _setup_stage(self, stage, num_steps, resume):
        """Weights, optimizer and schedule for the stage; returns (scheduler, step, consumed, skipped)."""
        engine = self.engine
        if resume is not None:
            self.optimizer = build_optimizer(engine, stage.optim)
            self.optimizer_stage = stage.name
            sched = LRScheduler(self.optimizer, stage.optim, num_steps)
            st = load_checkpoint(resume, engine, self.optimizer, sched, self.dims)
            self.log(f"  loaded {resume} (optimizer + schedule{', RNG' if st['rng_restored'] else ''})")
            return sched, int(st["step"]), int(st["consumed_samples"].get(stage.name, 0)), \
                int(st.get("skipped_steps", {}).get(stage.name, 0))
        prev = self._prev_stage(stage)
        src = None
        if stage.init_from == "previous" and prev is not None and self._holds == prev.name:
            self.log(f"  weights: final weights of stage {prev.name} (in memory)")
        else:
            src = self._init_source(stage)
            if src == "seed":
                if self._holds != "__seed__":
                    engine._init_from_seed(self.recipe.seed)
                self.log(f"  weights: initialized from seed {self.recipe.seed}")
            else:
                load_model_only(src, engine)
                self.log(f"  weights: {src}")
        keep_optim = not stage.reset_optimizer and prev is not None
        if keep_optim and self.optimizer is not None and self.optimizer_stage == prev.name:
            for g in self.optimizer.param_groups:  # new stage's hyper-parameters, old moments
                g["betas"], g["eps"] = (stage.optim.beta1, stage.optim.beta2), stage.optim.eps
        else:
            self.optimizer = build_optimizer(engine, stage.optim)
            if keep_optim:
                path = src if isinstance(src, Path) else stage_final_checkpoint(self.ckpt_root, prev.name)
                if path is not None and (Path(path) / "optim" / ".metadata").is_file():
                    load_optimizer_shards(self.optimizer, engine, Path(path) / "optim")
        self.optimizer_stage = stage.name
        self._holds = None
        return LRScheduler(self.optimizer, stage.optim, num_steps), 0, 0, 0

    def _trainer_state(self, stage, step, consumed, skipped, complete):
        self.state["consumed_samples"][stage.name] = consumed
        self.state["skipped_steps"][stage.name] = skipped
        return {**self.state, "stage": stage.name, "step": step, "stage_complete": complete,
                "num_steps": stage.num_steps(), "rope_theta": self.stage_theta(stage)}

    def _save(self, stage, sched, step, consumed, skipped, complete):
        t = time.time()
        path = save_checkpoint(self.ckpt_root, self.engine, self.optimizer, sched,
                               self._trainer_state(stage, step, consumed, skipped, complete), self.recipe,
                               self.dims, model_cfg=self._model_cfg_for(stage))
        self.log(f"  checkpoint {path} ({time.time() - t:.1f}s)")
        return path

    def _run_stage(self, stage, resume) -> bool:
        engine, dims = self.engine, self.dims
        num_steps = stage.num_steps()
        theta = self.stage_theta(stage)
        d = stage.data
        self.log(f"=== stage {stage.name}: {num_steps} steps, seq {d.seq_length}, global batch "
                 f"{d.global_batch_size} (micro {d.micro_batch_size} x dp {dims.dp}), lr {stage.optim.lr:g} "
                 f"({stage.optim.decay_style}, warm-up {stage.optim.warmup_steps}), rope_theta {theta:g}, "
                 f"loss {stage.loss.type}, data {d.kind}")
        sched, step, consumed, skipped = self._setup_stage(stage, num_steps, resume)
        engine.set_rope_theta(theta)
        loss_fn = build_loss(stage.loss)
        ref = self._build_reference(stage) if _is_dpo(stage) else None
        data = self._build_data(stage, consumed, num_steps)
        nan_steps = _fault_value("nan_at_step")
        nan_lo, nan_hi = (None, None)
        if nan_steps:
            a, _, b = nan_steps.partition(":")
            nan_lo, nan_hi = int(a), int(b or a)
        exit_after = _fault_value("exit_after_step")
        exit_rank = None
        if exit_after and "@" in exit_after:
            exit_after, exit_rank = exit_after.split("@")
        step_sleep = float(_fault_value("step_sleep") or 0)
        consecutive = 0
        clip = stage.optim.clip_grad
        ckpt_interval = self.recipe.checkpoint.interval
        last = {}
        stage_t0, stage_tokens = time.time(), 0
        while step < num_steps:
            t0 = time.time()
            if step_sleep:
                time.sleep(step_sleep)
            mbs = data.next_global_batch()
            if ref is not None:
                self._add_reference_logps(mbs, ref)
            units = engine.global_units(mbs, loss_fn)
            out = engine.forward_backward(mbs, loss_fn, units)
            gstep = self.state["global_step"] + 1
            if nan_lo is not None and nan_lo <= gstep <= nan_hi:
                for p in engine.parameters():
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))
            norm = engine.clip_grad_norm_(clip)
            lr = sched.get_lr()
            loss = out["loss"]
            if not (math.isfinite(loss) and math.isfinite(norm)):
                engine.zero_grad()
                skipped += 1
                consecutive += 1
                self.log(f"  step {step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'grad norm'} "
                         f"(loss {loss}, norm {norm}); update skipped ({consecutive} in a row, {skipped} in stage)")
                if consecutive >= self.recipe.max_skipped_steps:
                    raise TrainingError(
                        f"stage {stage.name}: {consecutive} consecutive steps had a non-finite loss or gradient "
                        f"norm (max_skipped_steps={self.recipe.max_skipped_steps}); stopping at step {step + 1}. "
                        f"The last good checkpoint is {latest_checkpoint(self.ckpt_root)}")
            else:
                consecutive = 0
                self.optimizer.step()
                sched.step()
            engine.zero_grad()
            step += 1
            self.state["global_step"] = gstep
            consumed = data.consumed_samples
            dt = time.time() - t0
            ntok = self._step_tokens(mbs)
            stage_tokens += ntok
            scalars = {"loss": loss, "grad_norm": norm, "lr": lr, "step_time_s": dt,
                       "consumed_samples": consumed, "skipped_steps": skipped, "seq_length": d.seq_length,
                       "rope_theta": theta, "global_batch_size": data.global_batch_size_at(consumed)}
            scalars.update(throughput_metrics(ntok, dt, self.recipe.model, d.seq_length, dims.world_size,
                                              self.peak_tflops))
            scalars.update(memory_metrics(engine.device))
            scalars.update(out.get("metrics", {}))
            scalars.update({f"tokens/{k}": float(v) for k, v in data.tokens_per_source().items()})
            self.metrics.log_step(stage.name, step, scalars, global_step=gstep, total_steps=num_steps)
            last = scalars
            if stage.eval_interval and (step % stage.eval_interval == 0 or step == num_steps):
                last.update(self.evaluate(stage, step, loss_fn, ref))
            # no interval save inside a run of non-finite steps: `latest` stays the last good one
            if step < num_steps and ckpt_interval and step % ckpt_interval == 0 and consecutive == 0:
                self._save(stage, sched, step, consumed, skipped, complete=False)
            if exit_after is not None and gstep == int(exit_after) and (exit_rank is None or int(exit_rank) == dims.rank):
                os._exit(137)  # test hook: die like SIGKILL
            if step < num_steps and self.signal.should_stop(engine.device):
                self.log(f"  stop requested ({self.signal.name}) at step {step}: saving a checkpoint")
                self._save(stage, sched, step, consumed, skipped, complete=False)
                self.summary["stages"][stage.name] = {"steps": step, "stopped": True, **last}
                self.log(f"  stopped cleanly at stage {stage.name} step {step}")
                return True
        self.state["completed_stages"] = list(dict.fromkeys(self.state["completed_stages"] + [stage.name]))
        self._save(stage, sched, step, consumed, skipped, complete=True)
        self._holds = stage.name
        wall = time.time() - stage_t0
        self.summary["stages"][stage.name] = {"steps": step, "skipped": skipped, "tokens": stage_tokens,
                                              "tokens_per_s": stage_tokens / max(wall, 1e-9),
                                              "wall_s": wall, **last}
        return False

    def _step_tokens(self, mbs) -> int:
        n = sum(int(mb["input_ids"].numel()) for mb in mbs)
        if dist.is_initialized() and self.dims.dp > 1:
            t = torch.tensor([float(n)], device=self.engine.device)
            dist.all_reduce(t, group=self.dims.dp_group)
            n = int(t.item())
        return n

    @torch.no_grad()
    def evaluate(self, stage, step, loss_fn, ref=None) -> dict:
        if stage.name not in self._val_cache:  # the same held-out batches at every evaluation
            self._val_cache[stage.name] = self._build_validation(stage)
        val = self._val_cache[stage.name]
        if not val:
            return {}
        self.engine.eval()
        total, units_total = 0.0, 0.0
        for mbs in val:
            mbs = [dict(mb) for mb in mbs]
            if ref is not None:
                self._add_reference_logps(mbs, ref)
            units = self.engine.global_units(mbs, loss_fn)
            out = self.engine.forward_only(mbs, loss_fn, units)
            total += out["loss"] * units
            units_total += units
        self.engine.train()
        if units_total == 0:
            return {}
        scalars = {"loss": total / units_total}
        if stage.data.min_document_tokens > 0:
            scalars["long_doc_loss"] = scalars["loss"]
        self.metrics.log_eval(stage.name, step, scalars)
        self.log(f"  eval {stage.name} step {step}: val/loss {scalars['loss']:.4f}")
        return {f"val/{k}": v for k, v in scalars.items()}
