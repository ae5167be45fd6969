"""Unprivileged uids for sandboxes started by root, and the per-uid process bookkeeping.

A root caller (CI) runs each check under a uid of its own, taken from a range that no account and
no process uses. The uid is what keeps the program away from root's files and processes, and the
kernel applies RLIMIT_NPROC to it (never to root). A lock file (``flock``) per uid keeps two
concurrent checks -- threads of one oracle or processes of one machine -- off the same uid, so one
check's fork bomb never eats another's budget; the kernel drops the lock when its holder dies.

The process cap that does not depend on the uid at all is the pids cgroup
(:mod:`.pids_cgroup`); the uid and its RLIMIT_NPROC are the second layer.
"""
from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_UID_BASE = 60200  # between Debian's user range (<60000) and systemd's dynamic users (61184..)
DEFAULT_UID_COUNT = 256


class NoFreeUid(RuntimeError):
    pass


class UidPool:
    """Hands out uids nobody else uses, one per concurrent check, across threads and processes.

    A uid qualifies when no account has it and no process runs under it when the pool is built;
    a lock file per uid in a root-only directory keeps it to one check at a time machine-wide."""

    def __init__(self, base: int, count: int):
        busy = {owner(pid) for pid in live_pids()}
        self.uids = []
        for uid in range(base, base + count):
            try:
                pwd.getpwuid(uid)
                continue  # an account owns it
            except KeyError:
                pass
            if uid not in busy:
                self.uids.append(uid)
        if not self.uids:
            raise NoFreeUid(f"no free uid in {base}..{base + count - 1} (all have accounts or processes); "
                            "pass uid_base= to choose another range")
        self.lock_dir = Path(tempfile.gettempdir()) / "megatron_phi4_sandbox_uids"
        self.lock_dir.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(self.lock_dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o022:
            raise NoFreeUid(f"{self.lock_dir} must be a directory owned by root and not group/world writable; "
                            "remove it")
        self._mutex = threading.Lock()
        self._free = threading.Semaphore(len(self.uids))
        self._held: dict[int, int] = {}

    def acquire(self) -> int:
        import fcntl
        self._free.acquire()
        while True:
            with self._mutex:
                for uid in self.uids:
                    if uid in self._held:
                        continue
                    fd = os.open(self.lock_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        os.close(fd)
                        continue  # another process holds it
                    self._held[uid] = fd
                    return uid
            time.sleep(0.01)  # every free uid is held by other processes on this machine

    def release(self, uid: int) -> None:
        with self._mutex:
            fd = self._held.pop(uid)
        os.close(fd)  # drops the flock
        self._free.release()


_POOLS: dict[tuple[int, int], UidPool] = {}
_POOLS_LOCK = threading.Lock()


def uid_pool(base: int, count: int) -> UidPool:
    with _POOLS_LOCK:
        if (base, count) not in _POOLS:
            _POOLS[(base, count)] = UidPool(base, count)
        return _POOLS[(base, count)]


def kill_uid(uid: int) -> None:
    """Kill every process of a sandbox uid (a program may have left its process group with setsid).
    ``kill -KILL -1`` run *as that uid* reaches exactly its processes, atomically in the kernel; a
    /proc sweep then checks nothing is left."""
    kill = shutil.which("kill")
    if kill:
        subprocess.run([kill, "-KILL", "-1"], user=uid, group=uid, extra_groups=[], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    for _ in range(50):
        pids = [pid for pid in live_pids() if owner(pid) == uid]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)
    log.warning("sandbox uid %d still has processes after cleanup", uid)


def live_pids() -> list[int]:
    """Pids of processes that are not zombies (a zombie is dead; its parent has yet to reap it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != b"Z":
                pids.append(int(entry))
    return pids


def owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def task_count(uid: int) -> int:
    """Tasks (threads included, as RLIMIT_NPROC counts them) that ``uid`` runs on this host now."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
            if int(fields.get("Uid", "-1").split()[0]) == uid:
                count += int(fields.get("Threads", "1"))
        except (OSError, ValueError):
            continue
    return count
