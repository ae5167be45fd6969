"""A process sandbox for model-written Python: the host half.

Pivotal Token Search scores thousands of rollouts by running the code a model wrote. That code is
untrusted: it may loop forever, fork until the machine has no process slots left, allocate 64 GB,
delete files, read the project's data, open sockets, kill the process that checks it or print a
gigabyte. Each run therefore gets its own process tree, isolated by the strongest layers this
machine offers, in this order:

``bwrap``    bubblewrap: new pid, network, ipc, uts (and cgroup) namespaces; a private mount
             namespace whose root holds only /usr (read-only), the Python prefix (read-only), a
             fresh /proc and /dev, and a size-capped tmpfs at /tmp that is the working directory;
             the rest of the root is read-only; no /work, no /home, no host /tmp.
``unshare``  util-linux ``unshare``: new pid, network, ipc and uts namespaces, but the host's
             filesystem view (files are protected only by their permissions and the uid).
``rlimits``  no namespaces: a separate session, resource limits and (as root) a separate uid.

On every layer the child gets an empty working directory, a clean environment, stdin at
/dev/null, ``python -I`` (no user site, no environment variables, no cwd on sys.path) and the limits
of :class:`SandboxLimits` (RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE, no core
dumps), set inside the child by ``_sandbox_child.py`` before model code runs. The host adds the
wall-clock limit and caps what it reads from stdout/stderr.

The process cap, the one limit whose failure takes the whole machine down, has two independent
layers when the caller is root (CI):

1. a pids cgroup per run (:mod:`.pids_cgroup`): the run joins a fresh cgroup whose ``pids.max``
   is ``max_processes`` plus the sandbox's own helper processes *before* any of it runs, and the
   cgroup is emptied and removed afterwards. It counts every task in it whatever its uid -- root's
   too;
2. an unprivileged uid of its own per run (:mod:`.uids`) with RLIMIT_NPROC = ``max_processes``
   (twice that as the backstop when a cgroup holds the run, so that the cgroup is the limit that
   binds and its refusals can be reported); the kernel never applies RLIMIT_NPROC to uid 0, hence
   the uid.

A non-root caller cannot make cgroups; bubblewrap then puts the program in a user namespace of its
own, where the kernel counts RLIMIT_NPROC for the namespace's uid separately from the caller's.

When a layer is missing the oracle falls back to the next one and says so: a warning is logged
once and every reason ends with ``[sandbox: ...]``. Nothing runs unsandboxed silently.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_phi4.posttrain.oracles import pids_cgroup, uids
from megatron_phi4.posttrain.oracles.capture import OutputCapture, describe_exit, remove_tree

log = logging.getLogger(__name__)

MODES = ("bwrap", "unshare", "rlimits")
_CHILD_SOURCE = (Path(__file__).with_name("_sandbox_child.py")).read_text()
_KEPT_OUTPUT = 4096  # characters of stdout (head) and stderr (tail) a result keeps
_SANDBOX_TMP = "/tmp"  # inside bubblewrap: the tmpfs that is both $TMPDIR and the working directory
# Tasks of the sandbox itself in the run's cgroup, on top of the program's max_processes: bwrap's
# outer process and its pid-1 reaper; unshare and the shell that is pid 1 of the namespace.
HELPER_TASKS = {"bwrap": 2, "unshare": 2, "rlimits": 0}


class SandboxError(RuntimeError):
    """The sandbox itself could not run (missing tool, broken setup): never the program's fault,
    so it is raised rather than reported as a failed check."""


class SandboxUnavailable(SandboxError):
    """The requested isolation mode cannot run on this machine."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-check limits. ``timeout_s`` is wall-clock time for program + tests, counted from the
    moment the sandboxed interpreter is ready (a loaded machine does not eat into it);
    ``startup_timeout_s`` guards the start itself and raises :class:`SandboxError` when exceeded."""

    timeout_s: float = 10.0
    memory_mb: int = 512          # RLIMIT_AS per process
    max_processes: int = 16       # RLIMIT_NPROC: processes *and threads*
    max_output_bytes: int = 1 << 20  # stdout + stderr; more kills the run
    max_file_mb: int = 16         # RLIMIT_FSIZE: largest file the program may write
    tmpfs_mb: int = 64            # bwrap: size of the working directory (a tmpfs)
    max_open_files: int = 64      # RLIMIT_NOFILE
    startup_timeout_s: float = 60.0

    def __post_init__(self):
        for name in ("timeout_s", "startup_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ValueError(f"SandboxLimits.{name}: must be a positive finite number of seconds, got {value!r}")
        for name in ("memory_mb", "max_processes", "max_output_bytes", "max_file_mb", "tmpfs_mb", "max_open_files"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SandboxLimits.{name}: must be a positive integer, got {value!r}")
        if self.memory_mb < 64:
            raise ValueError(f"SandboxLimits.memory_mb: the interpreter needs at least 64 MiB, got {self.memory_mb}")
        if self.max_open_files < 16:
            raise ValueError(f"SandboxLimits.max_open_files: the interpreter needs at least 16, got {self.max_open_files}")

    @property
    def cpu_seconds(self) -> int:
        # CPU time backs up the wall clock for every process of the tree (each has its own budget);
        # the second of slack covers interpreter start-up.
        return int(math.ceil(self.timeout_s)) + 1


@dataclass(frozen=True)
class SandboxRun:
    """What happened to one run. ``passed`` is True only when the sandboxed harness itself reported
    that the tests ran to the end; ``reason`` says why not otherwise."""

    passed: bool
    reason: str
    stdout: str = ""
    stderr: str = ""
    elapsed_s: float = 0.0
    returncode: int | None = None


# ---------------------------------------------------------------------------------------------
# The interpreter the sandbox runs and what of the filesystem it needs.


def _base_interpreter() -> tuple[str, str]:
    """(interpreter path, prefix to expose): the base installation even inside a virtualenv, whose
    own directory may live under the project."""
    executable = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(executable), os.path.realpath(sys.base_prefix)


def _interpreter_prefix(python: str) -> str:
    """The installation prefix of another interpreter (``.../bin/python3`` -> ``...``)."""
    real = os.path.realpath(python)
    out = subprocess.run([real, "-I", "-c", "import sys; print(sys.base_prefix)"], capture_output=True,
                         text=True, timeout=60)
    if out.returncode != 0:
        raise SandboxUnavailable(f"python={python!r} does not run: {out.stderr.strip()[-300:]}")
    return os.path.realpath(out.stdout.strip())


def _world_readable(path: str) -> str | None:
    """None when any uid can reach ``path``; otherwise the first ancestor that blocks it."""
    parts = Path(path).parts
    for i in range(1, len(parts) + 1):
        p = str(Path(*parts[:i]))
        st = os.stat(p)
        need = stat.S_IXOTH if stat.S_ISDIR(st.st_mode) or i < len(parts) else stat.S_IROTH
        if not st.st_mode & need:
            return f"{p} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


# ---------------------------------------------------------------------------------------------
# Command lines per mode.


def _bwrap_argv(python: str, prefix: str, limits: SandboxLimits, as_root: bool, env: dict[str, str],
                *, disable_userns: bool = False, mount_proc: bool = True) -> list[str]:
    argv = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv"]
    if as_root:
        # bwrap runs privileged (no user namespace) with only the two capabilities the child needs to
        # drop to its uid; the kernel then clears them. Binds are nosuid and no_new_privs is set.
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user"] + (["--disable-userns"] if disable_userns else [])
    for key, value in env.items():
        argv += ["--setenv", key, value]
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + top
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for path in _exposed_trees(python, prefix):
        ancestors = []
        parent = os.path.dirname(path)
        while parent not in ("/", ""):
            ancestors.append(parent)
            parent = os.path.dirname(parent)
        for ancestor in reversed(ancestors):  # traversable even where the host's are not (/root)
            if not ancestor.startswith("/usr"):
                argv += ["--perms", "0755", "--dir", ancestor]
        argv += ["--ro-bind", path, path]
    if mount_proc:
        argv += ["--proc", "/proc"]
    argv += ["--dev", "/dev",
             "--perms", "1777", "--size", str(limits.tmpfs_mb << 20), "--tmpfs", _SANDBOX_TMP,
             "--remount-ro", "/dev", "--remount-ro", "/",  # the root and /dev tmpfs have no size cap
             "--chdir", _SANDBOX_TMP, "--", python, "-I", "-B", "-u", "-c", _CHILD_SOURCE]
    return argv


def _exposed_trees(python: str, prefix: str) -> list[str]:
    trees = [] if prefix.startswith("/usr/") or prefix == "/usr" else [prefix]
    if not any(python.startswith(t + "/") for t in trees + ["/usr"]):
        trees.append(os.path.dirname(python))
    return trees


def _unshare_argv(python: str, as_root: bool) -> list[str]:
    argv = ["unshare", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount", "--mount-proc"]
    if not as_root:
        argv.insert(1, "--map-root-user")
    # A shell is pid 1 of the namespace, so the program is not: the kernel shields a namespace's
    # init from its own processes' signals, which would let ``kill -9 -1`` pass unnoticed. The shell
    # reports a child killed by signal N as 128 + N, as bwrap does.
    return argv + ["--", "/bin/sh", "-c", '"$@"; exit $?', "sandbox", python, "-I", "-B", "-u", "-c", _CHILD_SOURCE]


# ---------------------------------------------------------------------------------------------


_PROBED: dict[tuple, str | None] = {}
_PROBE_LOCK = threading.Lock()
_WARNED: set[str] = set()


@dataclass
class Sandbox:
    """Runs ``program`` then ``tests`` in a fresh sandbox per call; thread-safe.

    ``mode``: ``"auto"`` (the strongest that works here), or one of :data:`MODES` to insist on it
    (raises :class:`SandboxUnavailable` when it cannot run). ``python``: the interpreter to run
    inside (default: this process's base interpreter). ``pids_cgroup``: None (as root: use one when
    the machine has a pids cgroup hierarchy, else say so and rely on the uid's RLIMIT_NPROC), True
    (insist: raise :class:`SandboxUnavailable` without one) or False (do not use one)."""

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    mode: str = "auto"
    python: str | None = None
    uid_base: int = uids.DEFAULT_UID_BASE
    uid_count: int = uids.DEFAULT_UID_COUNT
    pids_cgroup: bool | None = None

    def __post_init__(self):
        if self.mode != "auto" and self.mode not in MODES:
            raise ValueError(f"Sandbox.mode: got {self.mode!r}, allowed: 'auto', {', '.join(map(repr, MODES))}")
        if self.pids_cgroup not in (None, True, False):
            raise ValueError(f"Sandbox.pids_cgroup: None, True or False, got {self.pids_cgroup!r}")
        if self.python is None:
            self._python, self._prefix = _base_interpreter()
        else:
            self._python = os.path.realpath(self.python)
            self._prefix = _interpreter_prefix(self._python)
        self.as_root = os.geteuid() == 0
        self._uids = None
        if self.as_root:
            try:
                self._uids = uids.uid_pool(self.uid_base, self.uid_count)
            except uids.NoFreeUid as exc:
                raise SandboxUnavailable(str(exc)) from None
        self._cgroups, self._cgroup_note = self._setup_cgroups()
        # Without namespaces and without root, the program runs as the caller's uid: its
        # RLIMIT_NPROC must count the caller's tasks, so it is fixed once, here, at what the
        # caller runs now plus max_processes; runs take turns so that they do not share it.
        self._same_uid_nproc = uids.task_count(os.getuid()) + self.limits.max_processes if not self.as_root else None
        self._one_at_a_time = threading.Lock()
        self.mode, self._variant, self.note = self._choose_mode(self.mode)

    def _setup_cgroups(self) -> tuple[pids_cgroup.PidsCgroups | None, str]:
        if self.pids_cgroup is False:
            return None, ""
        if not self.as_root:
            if self.pids_cgroup:
                raise SandboxUnavailable("pids_cgroup=True needs a root caller (cgroups are root's to make)")
            return None, ""
        try:
            return pids_cgroup.host_cgroups(), ""
        except pids_cgroup.PidsCgroupUnavailable as exc:
            if self.pids_cgroup:
                raise SandboxUnavailable(f"no pids cgroup: {exc}") from None
            return None, f"no pids cgroup ({exc}): the process cap is the sandbox uid's RLIMIT_NPROC alone"

    # -- mode selection -------------------------------------------------------------------------

    def _choose_mode(self, wanted: str) -> tuple[str, dict, str]:
        failures = []
        for mode in (MODES if wanted == "auto" else (wanted,)):
            for variant in self._variants(mode):
                key = (mode, tuple(sorted(variant.items())), self._python, self.as_root, self._cgroups is None)
                with _PROBE_LOCK:
                    if key not in _PROBED:
                        _PROBED[key] = self._probe(mode, variant)
                    error = _PROBED[key]
                if error is None:
                    note = "; ".join(n for n in (self._degradation_note(mode), self._cgroup_note) if n)
                    note = f"sandbox: {note}" if note else ""
                    if note and note not in _WARNED:
                        _WARNED.add(note)
                        log.warning("code sandbox runs degraded: %s%s", note,
                                    f" (stronger modes failed: {'; '.join(failures)})" if failures else "")
                    return mode, variant, note
                failures.append(f"{mode}: {error}")
        raise SandboxUnavailable("no usable sandbox: " + "; ".join(failures))

    def _variants(self, mode: str) -> list[dict]:
        if mode == "bwrap":
            if self.as_root:
                return [{"mount_proc": True}, {"mount_proc": False}]
            return [{"disable_userns": True, "mount_proc": True}, {"disable_userns": False, "mount_proc": True},
                    {"disable_userns": False, "mount_proc": False}]
        return [{}]

    def _probe(self, mode: str, variant: dict) -> str | None:
        """None when ``mode`` runs a trivial program here, else why not."""
        tool = {"bwrap": "bwrap", "unshare": "unshare"}.get(mode)
        if tool and shutil.which(tool) is None:
            return f"{tool} is not installed"
        if mode != "bwrap" and self.as_root:
            blocked = _world_readable(self._python) or _world_readable(self._prefix)
            if blocked:
                return (f"the interpreter {self._python} is not readable by an unprivileged uid ({blocked} blocks "
                        "it); pass python= an interpreter every user can run, e.g. /usr/bin/python3")
        try:
            run = self._run(mode, variant, "x = 1\n", "assert x == 1\n")
        except SandboxError as exc:
            return str(exc)
        return None if run.passed else run.reason

    def _degradation_note(self, mode: str) -> str:
        if mode == "bwrap":
            return ""
        if mode == "unshare":
            return ("unshare -- pid/net/ipc namespaces but the host filesystem is visible"
                    + ("" if self.as_root else " and writable wherever the caller's uid may write"))
        if self.as_root:
            return "rlimits -- a separate uid and limits only: network, pids and host files are not isolated"
        return ("rlimits -- limits only, same uid as the caller: network, pids and files are not isolated, the "
                "program can signal the caller, and runs take turns")

    # -- one run --------------------------------------------------------------------------------

    def run(self, program: str, tests: str) -> SandboxRun:
        result = self._run(self.mode, self._variant, program, tests)
        if self.note:
            result = SandboxRun(result.passed, f"{result.reason} [{self.note}]", result.stdout, result.stderr,
                                result.elapsed_s, result.returncode)
        return result

    def _run(self, mode: str, variant: dict, program: str, tests: str) -> SandboxRun:
        if mode == "rlimits" and not self.as_root:
            with self._one_at_a_time:
                return self._run_isolated(mode, variant, program, tests)
        return self._run_isolated(mode, variant, program, tests)

    def _run_isolated(self, mode: str, variant: dict, program: str, tests: str) -> SandboxRun:
        limits = self.limits
        uid = workdir = cgroup = None
        if self.as_root:
            uid = self._uids.acquire()
        try:
            if self._cgroups is not None:
                try:
                    cgroup = self._cgroups.create(limits.max_processes + HELPER_TASKS[mode])
                except pids_cgroup.PidsCgroupUnavailable as exc:
                    raise SandboxError(str(exc)) from None
            if mode == "bwrap":
                cwd = _SANDBOX_TMP
            else:
                workdir = self._make_workdir(uid)
                cwd = workdir
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8",
                   "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            if mode == "bwrap":
                argv = _bwrap_argv(self._python, self._prefix, limits, self.as_root, env, **variant)
            elif mode == "unshare":
                argv = _unshare_argv(self._python, self.as_root)
            else:
                argv = [self._python, "-I", "-B", "-u", "-c", _CHILD_SOURCE]
            if cgroup is not None:
                argv = pids_cgroup.join_argv(cgroup, argv)
            run = self._execute(argv, env, workdir, uid, mode, program, tests, cgroup is not None)
            if cgroup is not None and not run.passed and cgroup.limit_hits():
                run = SandboxRun(False, f"{run.reason} (the process limit of {limits.max_processes} was reached)",
                                 run.stdout, run.stderr, run.elapsed_s, run.returncode)
            return run
        finally:
            # Order matters: nothing of the run may outlive it, and its uid goes back to the pool
            # only when no process of it is left to count against the next run's RLIMIT_NPROC.
            emptied = cgroup.destroy() if cgroup is not None else False
            if uid is not None:
                if not emptied:
                    uids.kill_uid(uid)  # no cgroup that held every process of the run: sweep by uid
                self._uids.release(uid)
            if workdir is not None:
                remove_tree(workdir)

    def _make_workdir(self, uid: int | None) -> str:
        base = Path(tempfile.gettempdir()) / f"megatron_phi4_sandbox_{os.geteuid()}"
        base.mkdir(mode=0o711, exist_ok=True)
        st = os.lstat(base)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise SandboxError(f"{base} must be a directory owned by uid {os.geteuid()}; remove it")
        os.chmod(base, 0o711)  # others may enter their own workdir, not list the others
        workdir = tempfile.mkdtemp(prefix="run-", dir=base)
        if uid is not None:
            os.chown(workdir, uid, uid)
        return workdir

    def _execute(self, argv, env, workdir, uid, mode, program, tests, in_cgroup) -> SandboxRun:
        limits = self.limits
        result_r, result_w = os.pipe()
        nonce = secrets.token_hex(16)
        if not self.as_root and mode == "rlimits":
            nproc = self._same_uid_nproc
        elif in_cgroup:
            # The cgroup is the cap that binds (exactly, and it counts refusals for the reason);
            # RLIMIT_NPROC is the backstop should that layer fail. The kernel raises the uid's count
            # for a fork before the cgroup charges it, so a burst of forks inflates the count by up
            # to one per live task: at twice the cgroup's share it never refuses first.
            nproc = 2 * limits.max_processes
        else:
            nproc = limits.max_processes
        payload = json.dumps({
            "program": program, "tests": tests, "nonce": nonce, "result_fd": result_w,
            "uid": uid, "workdir": workdir or _SANDBOX_TMP, "max_processes": nproc,
            "memory_bytes": limits.memory_mb << 20, "file_bytes": limits.max_file_mb << 20,
            "max_open_files": limits.max_open_files, "cpu_seconds": limits.cpu_seconds,
        }).encode()
        stdin = os.memfd_create("sandbox-payload", os.MFD_CLOEXEC)
        try:
            os.write(stdin, payload)
            os.lseek(stdin, 0, os.SEEK_SET)
            started = time.monotonic()
            try:
                proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        pass_fds=(result_w,), env=env, cwd=workdir or "/", start_new_session=True)
            except OSError as exc:
                raise SandboxError(f"cannot start the sandbox ({argv[0]}): {exc}") from exc
        finally:
            os.close(stdin)
            os.close(result_w)
        try:
            return self._supervise(proc, result_r, nonce, uid, mode, started)
        finally:
            os.close(result_r)

    def _supervise(self, proc, result_r, nonce, uid, mode, started) -> SandboxRun:
        """Read stdout, stderr and the result pipe until the sandbox's main process exits,
        enforcing the output cap and the wall clock; kill the whole sandbox at the end."""
        limits = self.limits
        capture = OutputCapture({"stdout": proc.stdout.fileno(), "stderr": proc.stderr.fileno(), "result": result_r},
                                limits.max_output_bytes)
        pidfd = os.pidfd_open(proc.pid)
        deadline = started + limits.startup_timeout_s
        ran_from = failure = None
        exited = False
        try:
            with selectors.DefaultSelector() as selector:
                for fd in capture.fds:
                    selector.register(fd, selectors.EVENT_READ)
                selector.register(pidfd, selectors.EVENT_READ)
                while failure is None and not exited:
                    now = time.monotonic()
                    if now >= deadline:
                        if ran_from is None:
                            raise SandboxError(f"the sandbox did not start within {limits.startup_timeout_s:g} s")
                        failure = f"timed out after {limits.timeout_s:g} s (wall clock)"
                        break
                    for key, _ in selector.select(timeout=deadline - now):
                        if key.fd == pidfd:
                            exited = True
                        elif not capture.read(key.fd):
                            selector.unregister(key.fd)  # end of file
                    if ran_from is None and capture.event("started", nonce):
                        ran_from = time.monotonic()
                        deadline = ran_from + limits.timeout_s
                        _check_identity(capture.event("started", nonce), uid)
                    failure = capture.overflow()
            if exited and failure is None:
                # What the main process wrote before it exited is in the pipes now; anything it left
                # behind that still writes is about to be killed.
                capture.drain()
                failure = capture.overflow()
                if ran_from is None and capture.event("started", nonce):
                    ran_from = time.monotonic()
                    _check_identity(capture.event("started", nonce), uid)
        finally:
            os.close(pidfd)
            self._kill(proc)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        elapsed = time.monotonic() - (ran_from or started)
        rc = proc.returncode
        out = capture.text("stdout")[:_KEPT_OUTPUT]  # results are kept by the thousand
        err = capture.text("stderr")[-_KEPT_OUTPUT:]
        if ran_from is None and failure is None:
            raise SandboxError(f"the sandbox exited (status {rc}) before the program started: {err.strip()[-500:]}")
        verdict = capture.event("verdict", nonce)
        if failure is None and verdict is not None:
            return SandboxRun(verdict.get("passed") is True, str(verdict.get("reason", ""))[:1000], out, err, elapsed, rc)
        return SandboxRun(False, failure or describe_exit(rc, mode, err), out, err, elapsed, rc)

    @staticmethod
    def _kill(proc) -> None:
        """Kill the sandbox's process group (its leader is not reaped yet, so the group id cannot
        have been reused). In bwrap/unshare the pid namespace dies with it (bwrap
        --die-with-parent, unshare --kill-child); the run's cgroup and uid sweeps in ``_run``
        then catch whatever left the group."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _check_identity(started: dict, uid: int | None) -> None:
    """The harness reports the uid it runs the program under; a root caller's sandbox must never
    run it as root (a defect in the harness, never the program's doing, so it raises)."""
    if uid is not None and started.get("uids") != [uid, uid, uid]:
        raise SandboxError(f"the sandbox runs the program as uids {started.get('uids')}, not as {uid}: refusing")
