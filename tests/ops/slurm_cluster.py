"""A real two-node SLURM cluster on one machine, for tests: munged, slurmctld and two slurmd.

Why a real one: sbatch scripts are shell programs whose bugs (quoting, signal traps, environment
propagation, requeue) only show when SLURM runs them. Debian's slurm-wlm 22.05 can run several
slurmd on one host (``slurmd -N NAME`` with distinct ports), so two "nodes" cost nothing but a few
daemons.

Isolation: every file (config, state, spool, pid, log, munge key and socket) lives in one temporary
directory; clients find the cluster only through ``SLURM_CONF``; the controller listens for
127.0.0.1, the nodes have ``NodeAddr`` 127.0.0.2 and 127.0.0.3, and all ports are picked free. No
address outside 127.0.0.0/8 is used.

Clean-up by PID: slurmd double-forks its ``slurmstepd`` processes, which would be re-parented to
PID 1 (and, on machines whose PID 1 does not reap, linger as zombies). While the cluster runs, the
test process is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so they become its children
instead. ``stop()`` cancels the jobs, then terminates every process that carries this cluster's
own ``SLURM_CONF`` path in its environment (daemons, step daemons, batch scripts, job tasks; the
path is unique to the temporary directory) plus their descendants, SIGKILLs what is left after
10 s, and reaps them.

``MiniSlurm.unavailable()`` says why the machine cannot host one (not root, packages missing),
so the tests skip with that reason.
"""
from __future__ import annotations

import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "munge", "unmunge")
NODES = (("n1", "127.0.0.2"), ("n2", "127.0.0.3"))
# What .ci/run installs (Debian 12): see /work/shared/reference/slurm.md.
APT_PACKAGES = "slurm-wlm slurmctld slurmd slurm-client munge"


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                       if os.access(p, os.X_OK)), None)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """PIDs below ``pid`` (children first-level first), read from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry in f.read().split(b"\0")
    except OSError:
        return False


def _set_child_subreaper(on: bool) -> bool:
    """Make orphaned descendants of this process its children (Linux >= 3.4). Best effort."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1 if on else 0, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class SlurmError(RuntimeError):
    pass


class MiniSlurm:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="phi4-slurm-"))
        self.root.chmod(0o755)  # the munge user must reach its own subdirectory
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.host = socket.gethostname().split(".")[0]
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if k != "SLURM_CONF":
                del self.env[k]
        self.node_addr = dict(NODES)
        self._subreaper = False

    # ------------------------------------------------------------------ availability
    @staticmethod
    def unavailable() -> str | None:
        """None when a cluster can start here, else the reason it cannot."""
        if os.name != "posix" or not hasattr(os, "geteuid"):
            return "needs Linux"
        if os.geteuid() != 0:
            return "needs root (slurmd runs job steps as the submitting user)"
        missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
        if missing:
            return (f"SLURM/munge not installed (missing {', '.join(missing)}); "
                    f"apt-get install -y --no-install-recommends {APT_PACKAGES}")
        try:
            pwd.getpwnam("munge")
        except KeyError:
            return "no 'munge' user (install Debian's munge package)"
        for _, addr in NODES:
            try:
                with socket.socket() as s:
                    s.bind((addr, 0))
            except OSError as e:
                return f"cannot bind loopback address {addr}: {e}"
        return None

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout: float = 60.0) -> "MiniSlurm":
        self._subreaper = _set_child_subreaper(True)
        try:
            self._start_munge()
            self._write_conf()
            for d in ("state", "spool", "log", *(f"spool/{n}" for n, _ in NODES)):
                (self.root / d).mkdir(exist_ok=True)
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout,
                       "slurmctld answering `scontrol ping`", "slurmctld")
            for name, _ in NODES:
                self._spawn(f"slurmd-{name}", [_which("slurmd"), "-D", "-N", name, "-f", str(self.conf)])
            self._wait(self._nodes_idle, timeout, "both nodes idle in `sinfo`", "slurmd-n1")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        # munged insists: key readable by munge only; socket directory executable for everyone.
        pw = pwd.getpwnam("munge")
        etc, run = self.root / "munge-etc", self.root / "munge-run"
        etc.mkdir(mode=0o700)
        run.mkdir(mode=0o755)
        key = etc / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        for p in (etc, run, key):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        self.munge_socket = run / "munge.socket"
        self._spawn("munged", [_which("munged"), "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={run / 'munged.pid'}", f"--log-file={run / 'munged.log'}",
                               f"--seed-file={etc / 'munged.seed'}"], user=pw.pw_uid, group=pw.pw_gid)
        self._wait(lambda: subprocess.run(
            f"{_which('munge')} -n -S {self.munge_socket} | {_which('unmunge')} -S {self.munge_socket}",
            shell=True, capture_output=True).returncode == 0, 30, "munge -n | unmunge", "munged")

    def _write_conf(self) -> None:
        # cred_expire: a requeued job may start again only cred_expire + 1 s later (default 120 s);
        # 20 keeps the pre-emption test short while leaving step launches ample credential lifetime.
        r = self.root
        self.ctld_port = free_port()
        lines = [
            "ClusterName=phi4test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=20",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd'}.%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log'}/slurmd.%n.log",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "MpiDefault=none", "ReturnToService=2", "SlurmdParameters=config_overrides",
            "MailProg=/bin/true", "PlugStackConfig=/dev/null",
            "SchedulerType=sched/builtin", "JobRequeue=1",
            "KillWait=30", "MinJobAge=600", "InactiveLimit=0", "SlurmdTimeout=300",
            "MessageTimeout=30",
        ]
        for name, addr in NODES:
            lines.append(f"NodeName={name} NodeAddr={addr} NodeHostname={self.host} Port={free_port(addr)} "
                         f"CPUs=2 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(n for n, _ in NODES)} Default=YES "
                     f"MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: list[str], **kw) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        log.close()

    def _wait(self, ok, timeout: float, what: str, proc_name: str) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            p = self.procs.get(proc_name)
            if p is not None and p.poll() is not None:
                raise SlurmError(f"{proc_name} exited ({p.returncode}) before {what}:\n{self.logs()}")
            if ok():
                return
            time.sleep(0.3)
        raise SlurmError(f"timed out after {timeout}s waiting for {what}:\n{self.logs()}")

    def _nodes_idle(self) -> bool:
        r = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return all(states.get(n, "").startswith("idle") for n, _ in NODES)

    def cluster_pids(self) -> list[int]:
        """Every live process of this cluster: started here, or carrying its SLURM_CONF, and below."""
        entry = f"SLURM_CONF={self.conf}".encode()
        roots = [p.pid for p in self.procs.values()]
        roots += [int(d) for d in os.listdir("/proc")
                  if d.isdigit() and int(d) != os.getpid() and _environ_has(int(d), entry)]
        out: list[int] = []
        for pid in roots:
            for q in [pid] + _descendants(pid):
                if q not in out and q != os.getpid():
                    out.append(q)
        return [p for p in out if _alive(p)]

    def stop(self) -> None:
        """Cancel jobs, then SIGTERM (after 10 s SIGKILL) every process of the cluster, and reap."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--full", "--user", "root", check=False, timeout=15)
            except subprocess.TimeoutExpired:
                pass
        pids = self.cluster_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            self._reap([p for p in pids if p not in {q.pid for q in self.procs.values()}])
            time.sleep(0.1)
        late = self.cluster_pids()  # what ignored SIGTERM, and anything forked meanwhile
        for pid in late:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        own = {p.pid for p in self.procs.values()}
        self._reap([p for p in pids + late if p not in own] + self._adopted_step_daemons())
        self.procs.clear()
        if self._subreaper:
            _set_child_subreaper(False)
            self._subreaper = False

    @staticmethod
    def _adopted_step_daemons() -> list[int]:
        """slurmstepd processes re-parented to us (through the subreaper) that already ended."""
        out = []
        for d in os.listdir("/proc"):
            try:
                with open(f"/proc/{d}/stat") as f:
                    head, tail = f.read().rsplit(")", 1)
            except (OSError, ValueError):
                continue
            fields = tail.split()
            if head.split("(", 1)[-1].startswith("slurmstepd") and int(fields[1]) == os.getpid():
                out.append(int(d))
        return out

    @staticmethod
    def _reap(pids) -> None:
        """Collect the exit status of those of ``pids`` that are our (adopted) children."""
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    # ------------------------------------------------------------------ clients
    def run(self, *argv: str, check: bool = True, timeout: float = 60, env: dict | None = None,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run([_which(argv[0]) or argv[0], *argv[1:]], env={**self.env, **(env or {})},
                           capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and r.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def sbatch(self, *argv: str, env: dict | None = None, cwd=None) -> int:
        r = self.run("sbatch", "--parsable", *argv, env=env, cwd=cwd)
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if r.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", r.stdout))

    def wait_job(self, job_id: int, timeout: float, until=None) -> dict[str, str]:
        """Poll ``scontrol show job`` every 0.5 s until the job ends (or ``until(info)``)."""
        t0 = time.monotonic()
        info = {}
        while time.monotonic() - t0 < timeout:
            info = self.job(job_id)
            if until is not None and until(info):
                return info
            if until is None and info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                            "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                                                            "DEADLINE", "PREEMPTED"):
                return info
            time.sleep(0.5)
        raise SlurmError(f"job {job_id} not done after {timeout}s: {info}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        out = []
        for f in sorted(list(self.root.glob("*.stdout")) + list((self.root / "log").glob("*.log"))):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
