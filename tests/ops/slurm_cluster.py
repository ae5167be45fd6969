"""A real two-node SLURM cluster on one machine, for tests: munged, slurmctld and two slurmd.

Why a real one: sbatch scripts are shell programs whose bugs (quoting, signal traps, environment
propagation, requeue) only show when SLURM runs them. Debian's slurm-wlm 22.05 can run several
slurmd on one host (``slurmd -N NAME`` with distinct ports), so two "nodes" cost nothing but a few
daemons.

Isolation: every file (config, state, spool, pid, log, munge key and socket) lives in one temporary
directory; clients find the cluster only through ``SLURM_CONF``; the controller listens for
127.0.0.1, the nodes have ``NodeAddr`` 127.0.0.2 and 127.0.0.3, and all ports are picked free. No
address outside 127.0.0.0/8 is used. ``stop()`` cancels the jobs, then terminates every daemon this
object started -- and every process below them (job steps) -- by PID.

``MiniSlurm.unavailable()`` says why the machine cannot host one (not root, packages missing),
so the tests skip with that reason.
"""
from __future__ import annotations

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
        try:
            self._start_munge()
            self._write_conf()
            for d in ("state", "spool", "log"):
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
        self._spawn("munged", [_which("runuser"), "-u", "munge", "--", _which("munged"), "-F",
                               f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={run / 'munged.pid'}", f"--log-file={run / 'munged.log'}",
                               f"--seed-file={etc / 'munged.seed'}"])
        self._wait(lambda: subprocess.run(
            f"{_which('munge')} -n -S {self.munge_socket} | {_which('unmunge')} -S {self.munge_socket}",
            shell=True, capture_output=True).returncode == 0, 30, "munge -n | unmunge", "munged")

    def _write_conf(self) -> None:
        r = self.root
        self.ctld_port = free_port()
        lines = [
            "ClusterName=phi4test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
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

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
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

    def stop(self) -> None:
        """Cancel jobs, then SIGTERM (later SIGKILL) every process started here and its descendants."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", "root", check=False, timeout=15)
        pids: list[int] = []
        for name in reversed(list(self.procs)):  # slurmd first, munged last
            p = self.procs[name]
            pids += _descendants(p.pid) + [p.pid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()

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
