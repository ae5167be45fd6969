"""Logging set-up for entry points (the library only creates loggers; entry points configure them).

The library logs one line per verb (``apply_fsdp``, ``apply_recompute``, the pipeline schedule, ...).
``configure_logging`` shows them on rank 0 and only warnings and errors on the other ranks, with the
rank in every line; ``PHI4_LOG_LEVEL`` overrides the level.
"""
from __future__ import annotations

import logging
import os


def configure_logging(rank: int | None = None) -> None:
    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    level = os.environ.get("PHI4_LOG_LEVEL", "INFO" if rank == 0 else "WARNING").upper()
    logging.basicConfig(level=level, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s", force=True)
