"""A pids cgroup per sandboxed run: the process-count cap that also binds root.

Why not RLIMIT_NPROC alone: the kernel counts that limit per *uid* and never applies it to uid 0
(nor to CAP_SYS_RESOURCE/CAP_SYS_ADMIN holders). A cap built on it therefore holds only if the
uid drop really happened and nothing else runs under that uid; a root process that forks in a
loop -- a sandbox bug, a benchmark's "bare" baseline, a broken test -- fills the machine's pid
table (this project lost a shared machine that way). A pids cgroup counts the tasks (processes
*and* threads) inside it, whoever they run as, and makes fork/clone fail with EAGAIN at
``pids.max``. So a root caller puts every run in a fresh cgroup before any of the run's code
starts, and empties and removes the cgroup when the run ends.

Layout: ``<hierarchy>/<the caller's own cgroup>/megatron_phi4_sandbox/<pid>.<start time>.<n>``.
Nesting under the caller's cgroup keeps whatever limits the caller lives under (a container, a CI
job) in force for its sandboxes. A run directory whose creator is gone (killed before it could
clean up) is emptied and removed by the next :class:`PidsCgroups` of the same parent.

Both hierarchies are supported: cgroup v1 with a ``pids`` hierarchy mounted (e.g.
``/sys/fs/cgroup/pids``), and cgroup v2 where the unified mount lists ``pids`` in
``cgroup.controllers``. v2 only allows controllers below a cgroup that holds no processes (the
"no internal processes" rule), so there the parent goes under the caller's cgroup when ``pids``
can be enabled for its children, else under the root of the mount.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PARENT_NAME = "megatron_phi4_sandbox"


class PidsCgroupUnavailable(RuntimeError):
    """No pids cgroup can be made here (no hierarchy, no permission); the message says why."""


@dataclass(frozen=True)
class Hierarchy:
    """Where the pids controller is mounted. ``mount``: the mount point; ``mount_root``: the
    cgroup the mount shows at its top; ``own``: this process's cgroup in that hierarchy."""

    version: int
    mount: str
    mount_root: str
    own: str

    def directory(self, cgroup: str) -> Path:
        """The directory of ``cgroup`` (a path as /proc/<pid>/cgroup writes it) under the mount;
        a cgroup outside what the mount shows maps to the mount's top."""
        root = self.mount_root.rstrip("/")
        if cgroup == self.mount_root or root == "":
            relative = cgroup.lstrip("/")
        elif cgroup.startswith(root + "/"):
            relative = cgroup[len(root) + 1:]
        else:
            relative = ""
        return Path(self.mount, relative) if relative else Path(self.mount)


def find_pids_hierarchy(mountinfo: str, self_cgroup: str) -> tuple[Hierarchy | None, str]:
    """(hierarchy, "") for the texts of /proc/self/mountinfo and /proc/self/cgroup, or (None, why).
    A v1 ``pids`` mount wins: where pids is bound to v1 the v2 mount cannot have it."""
    v1_own = v2_own = None
    for line in self_cgroup.splitlines():
        hier_id, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier_id == "0" and controllers == "":
            v2_own = path
        elif "pids" in controllers.split(","):
            v1_own = path
    v2_mounts = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) < sep + 4:
            continue
        root, mount_point, fstype, super_options = fields[3], fields[4], fields[sep + 1], fields[sep + 3]
        mount_point = mount_point.replace("\\040", " ")
        if fstype == "cgroup" and "pids" in super_options.split(",") and v1_own is not None:
            return Hierarchy(1, mount_point, root, v1_own), ""
        if fstype == "cgroup2":
            v2_mounts.append((root, mount_point))
    for root, mount_point in v2_mounts:
        try:
            controllers = Path(mount_point, "cgroup.controllers").read_text().split()
        except OSError:
            continue
        if "pids" in controllers and v2_own is not None:
            return Hierarchy(2, mount_point, root, v2_own), ""
    if v2_mounts:
        return None, "no cgroup v1 'pids' hierarchy is mounted and no cgroup v2 mount offers the pids controller"
    return None, "no cgroup v1 'pids' hierarchy and no cgroup v2 hierarchy is mounted"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: with the pid, it names a process
    uniquely (pids are reused, start times of one pid are not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _read_pids(procs_file: Path) -> list[int]:
    try:
        return [int(line) for line in procs_file.read_text().split()]
    except FileNotFoundError:
        return []


class RunCgroup:
    """One run's cgroup. A process joins it by writing its own pid to :attr:`procs_file` before
    it starts anything else; its children are born inside."""

    def __init__(self, path: Path, version: int, max_tasks: int):
        self.path = path
        self.version = version
        self.max_tasks = max_tasks

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def tasks(self) -> int:
        """Tasks (processes and threads) in the cgroup now."""
        try:
            return int((self.path / "pids.current").read_text())
        except (OSError, ValueError):
            return 0

    def limit_hits(self) -> int:
        """How often a fork or clone in this cgroup was refused at pids.max."""
        try:
            for line in (self.path / "pids.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "max":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def destroy(self, timeout_s: float = 30.0) -> bool:
        """SIGKILL every process in the cgroup, wait until it is empty, remove it. False (and a
        warning) when it could not be removed in time; its limit keeps holding meanwhile."""
        deadline = time.monotonic() + timeout_s
        kill_file = self.path / "cgroup.kill"  # cgroup v2, Linux 5.14+: one write kills all, atomically
        if self.version == 2 and kill_file.exists():
            try:
                kill_file.write_text("1")
            except OSError:
                pass
        while True:
            pids = _read_pids(self.procs_file)
            if not pids:
                break
            self._kill(pids)
            if time.monotonic() > deadline:
                log.warning("sandbox cgroup %s still holds processes %s after %.0f s", self.path, pids[:10], timeout_s)
                return False
            time.sleep(0.002)
        while True:  # tasks that are dying still pin the cgroup for a moment (EBUSY)
            try:
                os.rmdir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    log.warning("cannot remove sandbox cgroup %s: %s", self.path, exc)
                    return False
                time.sleep(0.002)

    def _kill(self, pids: list[int]) -> None:
        """Signal through pidfds, and only processes still listed in the cgroup *after* their pidfd
        was opened: a pid that was reaped and reused by an outside process in between is not
        listed, and a pidfd never follows a pid to a new process."""
        fds = {}
        for pid in pids:
            try:
                fds[pid] = os.pidfd_open(pid)
            except OSError:
                pass  # already gone
        try:
            inside = set(_read_pids(self.procs_file))
            for pid, fd in fds.items():
                if pid in inside:
                    try:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    except OSError:
                        pass
        finally:
            for fd in fds.values():
                os.close(fd)


class PidsCgroups:
    """Makes per-run cgroups under this caller's ``megatron_phi4_sandbox`` parent (root only)."""

    def __init__(self, hierarchy: Hierarchy | None = None):
        if hierarchy is None:
            try:
                mountinfo = Path("/proc/self/mountinfo").read_text()
                own = Path("/proc/self/cgroup").read_text()
            except OSError as exc:
                raise PidsCgroupUnavailable(f"cannot read /proc/self: {exc}") from exc
            hierarchy, why = find_pids_hierarchy(mountinfo, own)
            if hierarchy is None:
                raise PidsCgroupUnavailable(why)
        self.hierarchy = hierarchy
        self.parent = self._make_parent()
        self._tag = f"{os.getpid()}.{_start_time(os.getpid())}"
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self.remove_stale()

    def _make_parent(self) -> Path:
        h = self.hierarchy
        own_dir = h.directory(h.own)
        candidates = [own_dir] if h.version == 1 else list(dict.fromkeys([own_dir, Path(h.mount)]))
        failures = []
        for base in candidates:
            parent = base / PARENT_NAME
            try:
                if h.version == 2:
                    _enable_pids_below(base)
                parent.mkdir(exist_ok=True)
                if h.version == 2:
                    _enable_pids_below(parent)
                probe = parent / "pids.max" if h.version == 1 else parent / "cgroup.subtree_control"
                if not probe.exists():
                    raise PidsCgroupUnavailable(f"{probe} is missing")
                return parent
            except (OSError, PidsCgroupUnavailable) as exc:
                failures.append(f"{parent}: {exc}")
        raise PidsCgroupUnavailable("cannot make a pids cgroup: " + "; ".join(failures))

    def create(self, max_tasks: int) -> RunCgroup:
        """A fresh, empty cgroup that admits at most ``max_tasks`` tasks."""
        with self._lock:
            name = f"{self._tag}.{next(self._counter)}"
        path = self.parent / name
        try:
            path.mkdir()
            (path / "pids.max").write_text(str(int(max_tasks)))
        except OSError as exc:
            try:
                os.rmdir(path)
            except OSError:
                pass
            raise PidsCgroupUnavailable(f"cannot make the run cgroup {path}: {exc}") from exc
        return RunCgroup(path, self.hierarchy.version, max_tasks)

    def remove_stale(self) -> None:
        """Empty and remove run cgroups whose creating process no longer exists."""
        for entry in self.parent.iterdir() if self.parent.is_dir() else ():
            pid, _, rest = entry.name.partition(".")
            start, _, _n = rest.partition(".")
            if not entry.is_dir() or not pid.isdigit() or not start:
                continue
            if _start_time(int(pid)) != start:
                RunCgroup(entry, self.hierarchy.version, 0).destroy(timeout_s=5)


def _enable_pids_below(directory: Path) -> None:
    """cgroup v2: let ``directory``'s children have the pids controller (its cgroup.subtree_control)."""
    control = directory / "cgroup.subtree_control"
    if "pids" in control.read_text().split():
        return
    control.write_text("+pids")


_HOST: PidsCgroups | None = None
_HOST_ERROR: str | None = None
_HOST_LOCK = threading.Lock()


def host_cgroups() -> PidsCgroups:
    """This process's :class:`PidsCgroups`, made once; raises :class:`PidsCgroupUnavailable`
    (the same reason every time) where there is none."""
    global _HOST, _HOST_ERROR
    with _HOST_LOCK:
        if _HOST is None and _HOST_ERROR is None:
            try:
                _HOST = PidsCgroups()
            except PidsCgroupUnavailable as exc:
                _HOST_ERROR = str(exc)
        if _HOST is None:
            raise PidsCgroupUnavailable(_HOST_ERROR)
        return _HOST


def join_argv(cgroup: RunCgroup, argv: list[str]) -> list[str]:
    """``argv`` started so that it is inside ``cgroup`` before it runs: a shell writes its own pid
    to cgroup.procs, then becomes ``argv`` (exec keeps the pid). A failed write ends the shell with
    status 125 and nothing of ``argv`` runs."""
    return ["/bin/sh", "-c", 'echo $$ > "$0" || exit 125; exec "$@"', str(cgroup.procs_file), *argv]
