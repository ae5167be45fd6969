"""Durable file operations shared by data shards, checkpoints, post-training records and the demo:
a file or directory becomes visible only when complete (write elsewhere, fsync, rename, fsync the
parent directory). The one place the project writes small files atomically."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

TMP_INFIX = ".tmp-"  # marks unfinished files and directories (checkpoint pruning skips them)


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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so readers see either the old file or the whole new one:
    write a temporary file in the same directory, fsync it, rename it over ``path``, fsync the dir.
    Creates missing parent directories; on any error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_INFIX}", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1,
                      sort_keys: bool = False) -> None:
    """``obj`` as JSON (one trailing newline) through ``atomic_write_text``; serialisation happens
    before anything is written, so an unserialisable object leaves the old file untouched."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")
