"""Durable file operations shared by data shards and checkpoints: a file or directory becomes
visible only when complete (write elsewhere, fsync, rename, fsync the parent directory)."""
from __future__ import annotations

import os


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power loss; best effort where the
    filesystem cannot (some network filesystems refuse to open directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
