"""Graceful stop on SIGTERM / SIGUSR1 (cluster pre-emption, ``scancel --signal``).

The handler only sets a flag. The training loop calls ``should_stop()`` after every step; it
all-reduces the flag (MAX) over the world so every rank agrees, then the trainer saves a
checkpoint and exits with status 0.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class StopSignal:
    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def install(self) -> "StopSignal":
        for sig in _SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            try:
                signal.signal(sig, prev)
            except (ValueError, TypeError):
                pass
        self._previous.clear()

    def should_stop(self, device=None) -> bool:
        """True on every rank if any rank received a signal (a collective when distributed)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if device is not None and torch.device(device).type != "cpu":
                flag = flag.to(device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "remote rank's signal"
