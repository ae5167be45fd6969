"""On-disk cache of index arrays, keyed by a hash of everything that defines them, and the rule
that decides which process builds them.

Layout: ``CACHE_DIR/<kind>-<sha256[:32]>/`` holding ``description.json`` and one ``NAME.npy`` per
array. An entry is built in ``CACHE_DIR/.tmp-<kind>-<hash>-<pid>-<rand>/`` and renamed into place,
so a directory that exists is complete. Arrays are loaded with ``mmap_mode="r"``: ranks on one node
share the page cache instead of each holding a private copy (about 49 GB per rank for a 10T-token
stage).

Who builds. Two mechanisms, because neither alone is enough on every cluster:

* :func:`build_collectively` (used by the trainer's stage data, inside a process group): global
  rank 0 builds first while every other rank waits in a collective; then local rank 0 of every
  node that still does not see the entry (node-local cache storage) builds it for its node; then
  everyone loads. One build per job on shared storage, one per node on node-local storage, and
  it relies on no file lock.
* ``fcntl.flock`` of ``CACHE_DIR/<kind>-<hash>.lock`` in :func:`cached_arrays` serializes
  builders that are not coordinated (several jobs or library users sharing a cache): the first
  builds, the others wait, find the entry and load it. Some network file systems do not honour
  ``flock`` (Lustre without ``-o flock`` even refuses it); an unsupported lock is skipped with a
  warning, and if a rename then loses a race the loser discards its copy -- both copies are
  identical because building is deterministic.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
import warnings
from typing import Callable, Dict, Optional, TypeVar

import numpy as np

__all__ = ["description_hash", "file_fingerprint", "cached_arrays", "file_lock",
           "build_collectively"]

T = TypeVar("T")


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


_warned_no_lock = False


@contextlib.contextmanager
def file_lock(path: str):
    """Exclusive ``fcntl.flock`` on ``path`` (created if missing) for the ``with`` body. Where the
    file system refuses locks (``ENOLCK``, ``EOPNOTSUPP``, ``ENOSYS``...) the body runs unlocked
    after a one-time warning: callers must stay correct without the lock (atomic renames)."""
    global _warned_no_lock
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError as e:
            if not _warned_no_lock:
                warnings.warn(f"{path}: file locks are not supported here ({e.strerror}); "
                              "continuing without one (concurrent builders may duplicate work)",
                              RuntimeWarning, stacklevel=3)
                _warned_no_lock = True
        yield
    finally:
        try:
            if locked:
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
    with file_lock(entry + ".lock"):
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


# --------------------------------------------------------------------------- who builds
def _local_rank(rank: int) -> Optional[int]:
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        v = os.environ.get(var)
        if v not in (None, ""):
            return int(v)
    return 0 if rank == 0 else None


def _all_ok(ok: bool) -> bool:
    """A barrier that also agrees on success: False if any rank passes False."""
    import torch
    import torch.distributed as dist
    backend = str(dist.get_backend())
    device = (torch.device("cuda", torch.cuda.current_device())
              if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available()
              else torch.device("cpu"))
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def collective_available() -> bool:
    """Whether a default process group of more than one rank exists."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def build_collectively(make: Callable[[], T]) -> T:
    """``make()`` on every rank of the default process group, such that cache entries ``make``
    writes are built by as few ranks as possible and the rest load them (memory-mapped).

    Phase 1: global rank 0 calls ``make()`` (builds every missing entry) while the others wait.
    Phase 2: every node's local rank 0 (``LOCAL_RANK`` or ``SLURM_LOCALID``) that has not built
    calls ``make()``: on shared storage it finds the entries and only loads them; on node-local
    storage it builds them for its node. Phase 3: every remaining rank calls ``make()`` and loads.
    Each rank calls ``make()`` exactly once. A collective: every rank must call it, in the same
    order as its other collectives. If ``make()`` raises on a builder, that rank re-raises and
    the others raise a ``RuntimeError`` naming the phase (no rank is left waiting).
    """
    import torch.distributed as dist
    rank = dist.get_rank()
    local = _local_rank(rank)
    result: Optional[T] = None
    done = False
    for phase, mine in ((1, rank == 0), (2, local == 0)):
        err: Optional[BaseException] = None
        if mine and not done:
            try:
                result, done = make(), True
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the others know
                err = e
        if not _all_ok(err is None):
            if err is not None:
                raise err
            raise RuntimeError(f"building cached data failed on another rank (phase {phase}: "
                               f"{'rank 0' if phase == 1 else 'a local rank 0'}); see its error")
    if not done:
        result = make()
    return result  # type: ignore[return-value]
