"""Learning-rate schedule: linear warm-up, then cosine / linear / constant decay to ``min_lr``.

``lr_at(step, cfg, total_steps)`` is a pure function of the step (0-based: the LR used by the
``step``-th optimizer update); ``LRScheduler`` applies it to an optimizer and checkpoints its
position through ``state_dict`` / ``load_state_dict`` (like ``torch.optim.lr_scheduler.LambdaLR``).
"""
from __future__ import annotations

import math


def lr_at(step: int, cfg, total_steps: int) -> float:
    """cfg: OptimizerConfig (lr, min_lr, warmup_steps, decay_style, decay_steps).

    Warm-up: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``. Decay runs over
    ``decay_steps`` (default: ``total_steps - warmup_steps``) from ``lr`` to ``min_lr`` and stays at
    ``min_lr`` after it."""
    warmup = int(cfg.warmup_steps)
    if warmup > 0 and step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.decay_style == "constant":
        return cfg.lr
    decay = cfg.decay_steps if cfg.decay_steps is not None else max(1, total_steps - warmup)
    decay = max(1, int(decay))
    # progress 0 at the first post-warm-up step, 1 at the last step of the stage
    denom = max(1, decay - 1)
    progress = min(1.0, max(0.0, (step - warmup) / denom))
    if cfg.decay_style == "linear":
        coeff = 1.0 - progress
    else:  # cosine
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * coeff


class LRScheduler:
    """Sets ``optimizer.param_groups[*]["lr"] = lr_at(step)``; ``step()`` advances after an update."""

    def __init__(self, optimizer, cfg, total_steps: int, last_step: int = 0):
        self.optimizer, self.cfg, self.total_steps = optimizer, cfg, int(total_steps)
        self.step_count = int(last_step)
        self._apply()

    def get_lr(self) -> float:
        return lr_at(self.step_count, self.cfg, self.total_steps)

    def _apply(self) -> None:
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        # total_steps stays the configured one: the recipe defines the stage's length
        self._apply()
