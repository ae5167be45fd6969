"""Fork-based multi-process runner for CPU (gloo) distributed tests.

``run_distributed(fn, world_size, *args, timeout=...)`` forks ``world_size`` processes from the
already-imported test process (so start-up costs milliseconds, not the seconds a fresh interpreter
importing torch would), initializes a gloo process group in each, runs ``fn(rank, world_size, *args)``
and returns the list of per-rank return values (they must be picklable). An exception on any rank is
re-raised in the parent with that rank's formatted traceback; on timeout every child is killed.

Each rank uses one torch thread: the test machines have few cores and eight oversubscribed ranks
spinning OpenMP pools are far slower than eight single-threaded ones.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback
from typing import Any, Callable

__all__ = ["run_distributed", "DistributedTestError", "free_port"]


class DistributedTestError(RuntimeError):
    """A rank raised; the message carries the rank and its traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, kwargs, conn, init_process_group):
    status, payload = "ok", None
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
            WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        )
        if init_process_group:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            payload = fn(rank, world_size, *args, **kwargs)
        finally:
            if init_process_group and dist.is_initialized():
                dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        status, payload = "error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"
    # Plain pickle to bytes: Connection.send would use torch's ForkingPickler, which shares tensor
    # storage through file descriptors served by this process -- gone once it exits.
    try:
        data = pickle.dumps((status, payload))
    except Exception as e:  # unpicklable result
        data = pickle.dumps(("error", f"rank {rank}: could not pickle the result: {e!r}"))
    conn.send_bytes(data)
    conn.close()
    os._exit(0)  # skip atexit handlers inherited from the parent (pytest, etc.)


_GRACE_S = 3.0
# Errors that are usually a consequence of another rank failing (its sockets closed).
_COLLATERAL = ("Connection reset by peer", "Connection closed by peer", "pair.cc", "Broken pipe",
               "process died", "Timed out", "timed out")


def _root_cause(errors: dict[int, str]) -> str:
    ranks = sorted(errors)
    primary = next((errors[r] for r in ranks if not any(c in errors[r] for c in _COLLATERAL)), errors[ranks[0]])
    others = [r for r in ranks if errors[r] is not primary]
    suffix = f"\n(ranks {others} failed too, most likely as a consequence)" if others else ""
    return primary + suffix


def run_distributed(fn: Callable[..., Any], world_size: int, *args, timeout: float = 120.0,
                    init_process_group: bool = True, **kwargs) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` forked gloo ranks.

    Returns the per-rank results in rank order. Raises ``DistributedTestError`` with the failing
    rank's traceback -- the root cause, not the "connection reset" of ranks that were waiting on it in
    a collective (those are listed after a short grace period, then killed) -- or ``TimeoutError``.
    ``init_process_group=False`` leaves process-group creation to ``fn`` (the environment variables
    MASTER_ADDR/PORT, RANK, WORLD_SIZE and LOCAL_RANK are set either way).
    """
    ctx = mp.get_context("fork")
    port = free_port()
    procs, conns = [], []
    for rank in range(world_size):
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(fn, rank, world_size, port, args, kwargs, child_conn,
                                              init_process_group), daemon=True)
        p.start()
        child_conn.close()
        procs.append(p)
        conns.append(parent_conn)

    results: list[Any] = [None] * world_size
    pending = set(range(world_size))
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while pending:
            if errors:  # the others usually fail right after (broken collectives): short grace period
                deadline = min(deadline, first_error_at + _GRACE_S)
            ready = mp.connection.wait([conns[r] for r in pending], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                if errors:
                    break
                raise TimeoutError(f"run_distributed: ranks {sorted(pending)} of {world_size} did not finish "
                                   f"within {timeout:.0f}s")
            for r in [r for r in pending if conns[r] in ready]:
                try:
                    status, payload = pickle.loads(conns[r].recv_bytes())
                except EOFError:
                    status, payload = "error", f"rank {r}: process died (exit code {procs[r].exitcode})"
                pending.discard(r)
                if status == "ok":
                    results[r] = payload
                else:
                    if not errors:
                        first_error_at = time.monotonic()
                    errors[r] = payload
        if errors:
            raise DistributedTestError(_root_cause(errors))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
        for c in conns:
            c.close()
    return results
