"""The built-in callbacks: what every run has unless the recipe turns it off.

Default order (``DEFAULT_CALLBACKS``): ``nonfinite`` (decides before the update), ``metrics``,
``evaluation``, ``stop_signal`` (decides whether to stop), ``checkpoint`` (saves at intervals, on a
stop and at the end of each stage).
"""
from __future__ import annotations

import math

from megatron_phi4.training.callbacks.base import Callback
from megatron_phi4.training.errors import TrainingError

DEFAULT_CALLBACKS = ("nonfinite", "metrics", "evaluation", "stop_signal", "checkpoint")


class NonFiniteStepPolicy(Callback):
    """A step whose loss or gradient norm is not finite updates nothing (gradients are dropped and
    the schedule does not advance); it is counted, and ``max_consecutive`` such steps in a row
    (default: the recipe's ``max_skipped_steps``) stop the run with ``TrainingError``."""

    name = "nonfinite"

    def __init__(self, max_consecutive: int | None = None):
        self.max_consecutive = max_consecutive

    def pre_optim_step(self, trainer, result) -> None:
        stage = trainer.stage
        if math.isfinite(result.loss) and math.isfinite(result.grad_norm):
            stage.consecutive_skipped = 0
            return
        result.skip_update = True
        stage.skipped += 1
        stage.consecutive_skipped += 1
        limit = self.max_consecutive or trainer.recipe.max_skipped_steps
        what = "loss" if not math.isfinite(result.loss) else "grad norm"
        trainer.log(f"  step {result.step}: non-finite {what} (loss {result.loss}, norm {result.grad_norm}); "
                    f"update skipped ({stage.consecutive_skipped} in a row, {stage.skipped} in stage)")
        if stage.consecutive_skipped >= limit:
            raise TrainingError(
                f"stage {stage.name}: {stage.consecutive_skipped} consecutive steps had a non-finite loss or "
                f"gradient norm (max_skipped_steps={limit}); stopping at step {result.step}. The last good "
                f"checkpoint is {trainer.checkpoints.latest()}")


class MetricsCallback(Callback):
    """TensorBoard scalars, metrics.jsonl and a console line (main rank only): loss, grad norm, lr,
    step time, tokens/s, TFLOP/s per device, MFU, memory, skipped steps, tokens per source, the
    loss's own metrics, and every evaluation."""

    name = "metrics"

    def __init__(self):
        self.logger = None

    def pre_run(self, trainer) -> None:
        from megatron_phi4.training.metrics import MetricsLogger, default_peak_tflops

        lg = trainer.recipe.logging
        self.logger = MetricsLogger(trainer.run_dir, enabled=trainer.is_main, tensorboard=lg.tensorboard,
                                    jsonl=lg.metrics_jsonl, log_interval=lg.log_interval)
        self.peak_tflops = lg.peak_tflops or default_peak_tflops(trainer.dims.device)

    def post_step(self, trainer, result) -> None:
        from megatron_phi4.training.metrics import memory_metrics, throughput_metrics

        stage = trainer.stage
        d = stage.config.data
        scalars = {"loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
                   "step_time_s": result.step_time, "consumed_samples": stage.data.consumed_samples,
                   "skipped_steps": stage.skipped, "seq_length": d.seq_length, "rope_theta": stage.rope_theta,
                   "global_batch_size": stage.data.global_batch_size_at(stage.data.consumed_samples)}
        scalars.update(throughput_metrics(result.tokens, result.step_time, trainer.recipe.model, d.seq_length,
                                          trainer.dims.world_size, self.peak_tflops))
        scalars.update(memory_metrics(trainer.engine.device))
        scalars.update(result.metrics)
        scalars.update({f"tokens/{k}": float(v) for k, v in stage.data.tokens_per_source().items()})
        stage.last_scalars = scalars
        self.logger.log_step(stage.name, result.step, scalars, global_step=result.global_step,
                             total_steps=stage.num_steps)

    def post_eval(self, trainer, metrics: dict) -> None:
        self.logger.log_eval(trainer.stage.name, trainer.stage.step, metrics)

    def post_run(self, trainer) -> None:
        if self.logger is not None:
            self.logger.close()


class EvaluationCallback(Callback):
    """Held-out loss every ``eval_interval`` steps of a stage and at its last step, on the same
    batches each time (``data.validation``); the long-document loss is reported separately in
    stages with a long-document filter."""

    name = "evaluation"

    def __init__(self):
        self._val: dict = {}

    def post_step(self, trainer, result) -> None:
        stage = trainer.stage
        every = stage.config.eval_interval
        if every and (stage.step % every == 0 or stage.step == stage.num_steps):
            metrics = self.evaluate(trainer)
            if metrics:
                stage.last_scalars.update({f"val/{k}": v for k, v in metrics.items()})
                trainer.callbacks.post_eval(trainer, metrics)

    def evaluate(self, trainer) -> dict:
        import torch

        stage, engine = trainer.stage, trainer.engine
        if stage.name not in self._val:
            self._val[stage.name] = trainer.build_validation_data(stage.config)
        val = self._val[stage.name]
        if not val:
            return {}
        engine.eval()
        total, units_total = 0.0, 0.0
        with torch.no_grad():
            for mbs in val:
                mbs = [dict(mb) for mb in mbs]
                stage.prepare_batch(mbs)
                units = engine.global_units(mbs, stage.loss_fn)
                out = engine.forward_only(mbs, stage.loss_fn, units)
                total += out["loss"] * units
                units_total += units
        engine.train()
        if units_total == 0:
            return {}
        metrics = {"loss": total / units_total}
        if stage.config.data.min_document_tokens > 0:
            metrics["long_doc_loss"] = metrics["loss"]
        trainer.log(f"  eval {stage.name} step {stage.step}: val/loss {metrics['loss']:.4f}")
        return metrics


class StopSignalCallback(Callback):
    """SIGTERM / SIGUSR1 (cluster pre-emption, ``scancel --signal``) stop the run after the current
    step with a checkpoint. The handler only sets a flag; after every step all ranks agree
    (all-reduce) whether any rank got a signal."""

    name = "stop_signal"

    def __init__(self):
        from megatron_phi4.training.signals import StopSignal

        self.signal = StopSignal()

    def pre_run(self, trainer) -> None:
        self.signal.install()

    def post_step(self, trainer, result) -> None:
        stage = trainer.stage
        if stage.step < stage.num_steps and self.signal.should_stop(trainer.engine.device):
            trainer.log(f"  stop requested ({self.signal.name}) at step {stage.step}: saving a checkpoint")
            trainer.request_stop(self.signal.name, save=True, by_signal=True)

    def post_run(self, trainer) -> None:
        self.signal.restore()


class CheckpointCallback(Callback):
    """Saves every ``checkpoint.interval`` steps (never inside a run of non-finite steps, so
    ``latest`` stays the last good one), when a stop with save is requested, and at the end of
    every stage (the checkpoint the next stage starts from)."""

    name = "checkpoint"

    def post_step(self, trainer, result) -> None:
        stage = trainer.stage
        interval = trainer.recipe.checkpoint.interval
        stop = trainer.stop_requested
        if stop is not None and stop.save:
            trainer.save_checkpoint()
        elif (interval and stage.step < stage.num_steps and stage.step % interval == 0
              and stage.consecutive_skipped == 0):
            trainer.save_checkpoint()

    def post_stage(self, trainer) -> None:
        trainer.save_checkpoint()
