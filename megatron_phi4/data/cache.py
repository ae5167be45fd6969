"""On-disk cache of index arrays, keyed by a hash of everything that defines them.

Layout: ``CACHE_DIR/<kind>-<sha256[:32]>/`` holding ``description.json`` and one ``NAME.npy`` per
array. An entry is built in ``CACHE_DIR/.tmp-<kind>-<hash>-<pid>-<rand>/`` and renamed into place,
so a directory that exists is complete. Concurrent builders (several ranks, several nodes sharing
the file system) serialize on ``fcntl.flock`` of ``CACHE_DIR/<kind>-<hash>.lock``: the first
builds, the others wait, find the entry and load it. If a rename loses a race (the entry appeared
anyway, e.g. locks not honoured on some network file systems) the loser discards its copy --
both copies are identical because building is deterministic.

Arrays are loaded with ``mmap_mode="r"``: ranks on one node share the page cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from typing import Callable, Dict, Optional

import numpy as np

__all__ = ["description_hash", "file_fingerprint", "cached_arrays"]


def description_hash(desc: dict) -> str:
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def file_fingerprint(path: str, content_hash: bool = False) -> dict:
    """Identity of a file for cache keys: absolute path, size, mtime (ns); optionally sha256."""
    st = os.stat(path)
    fp = {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if content_hash:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(16 << 20), b""):
                h.update(block)
        fp = {"size": st.st_size, "sha256": h.hexdigest()}
    return fp


@contextlib.contextmanager
def _flock(path: str):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _load(entry: str, names) -> Dict[str, np.ndarray]:
    return {n: np.load(os.path.join(entry, n + ".npy"), mmap_mode="r") for n in names}


def _complete(entry: str, names) -> bool:
    return os.path.isfile(os.path.join(entry, "description.json")) and all(
        os.path.isfile(os.path.join(entry, n + ".npy")) for n in names)


def cached_arrays(cache_dir: Optional[str], kind: str, desc: dict, names,
                  build: Callable[[], Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Return arrays ``names`` for ``desc``: loaded from the cache, or built (once) and saved.

    With ``cache_dir=None`` the arrays are built in memory and not saved.
    """
    names = list(names)
    if cache_dir is None:
        return build()
    os.makedirs(cache_dir, exist_ok=True)
    h = description_hash(desc)[:32]
    entry = os.path.join(cache_dir, f"{kind}-{h}")
    if _complete(entry, names):
        return _load(entry, names)
    with _flock(entry + ".lock"):
        if _complete(entry, names):
            return _load(entry, names)
        arrays = build()
        tmp = os.path.join(cache_dir, f".tmp-{kind}-{h}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            for n in names:
                with open(os.path.join(tmp, n + ".npy"), "wb") as f:
                    np.save(f, np.ascontiguousarray(arrays[n]), allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
            with open(os.path.join(tmp, "description.json"), "w") as f:
                json.dump(desc, f, indent=1, sort_keys=True, default=str)
            try:
                os.rename(tmp, entry)
            except OSError:
                if not _complete(entry, names):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # lost a race: identical content
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _load(entry, names)
