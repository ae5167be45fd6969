"""How many samples each optimizer step takes: a constant global batch, or megatron's linear
batch-size ramp.

The ramp is megatron's ``--rampup-batch-size start increment ramp_samples``: the global batch
starts at ``start`` and grows by ``increment`` every ``ramp_samples / num_increments`` consumed
samples until it reaches ``global_batch_size``. It is a function of the *consumed samples* (the
one quantity a checkpoint stores), so a resumed run continues on exactly the same schedule.

Reads only ``global_batch_size`` and ``batch_size_ramp`` of a data config (duck-typed, so this
module imports nothing).
"""
from __future__ import annotations

__all__ = ["global_batch_size_at", "num_samples_for", "steps_for"]


def global_batch_size_at(data_cfg, consumed_samples: int) -> int:
    """Global batch size for the step starting at ``consumed_samples``."""
    gbs = int(data_cfg.global_batch_size)
    ramp = data_cfg.batch_size_ramp
    if not ramp:
        return gbs
    start, inc, ramp_samples = (int(x) for x in ramp)
    if start <= 0 or inc <= 0 or ramp_samples < 0:
        raise ValueError(f"batch_size_ramp {ramp}: start and increment must be positive")
    if start >= gbs:
        return gbs
    if (gbs - start) % inc:
        raise ValueError(f"batch_size_ramp {ramp}: global_batch_size {gbs} - start {start} is not "
                         f"a multiple of the increment {inc}")
    if consumed_samples >= ramp_samples:
        return gbs
    n_inc = (gbs - start) // inc
    per_inc = ramp_samples / n_inc
    return min(gbs, start + int(consumed_samples // per_inc) * inc)


def num_samples_for(data_cfg, num_steps: int) -> int:
    """Samples consumed by ``num_steps`` optimizer steps (exact, also with a ramp)."""
    if not data_cfg.batch_size_ramp:
        return int(num_steps) * int(data_cfg.global_batch_size)
    c = 0
    for _ in range(int(num_steps)):
        c += global_batch_size_at(data_cfg, c)
    return c


def steps_for(data_cfg, consumed_samples: int) -> int:
    """Optimizer steps that consumed ``consumed_samples`` samples (the inverse of
    :func:`num_samples_for`; a partial step counts as a step)."""
    if not data_cfg.batch_size_ramp:
        return int(consumed_samples) // int(data_cfg.global_batch_size)
    c = t = 0
    while c < consumed_samples:
        c += global_batch_size_at(data_cfg, c)
        t += 1
    return t
