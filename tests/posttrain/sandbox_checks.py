"""Checks shared by the sandbox tests: the benign proof of a process cap that must come before
any fork bomb, and "the host is unaffected" after a hostile program."""
import dataclasses
import os
import shutil
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from megatron_phi4.posttrain.oracles import uids

ROOT = os.geteuid() == 0
PROJECT = Path(__file__).resolve().parents[2]
HAS_BWRAP = shutil.which("bwrap") is not None

SLEEPERS = textwrap.dedent("""
    import subprocess, time
    started, refused = [], 0
    for _ in range(200):
        try:
            started.append(subprocess.Popen(["sleep", "30"]))
        except OSError:
            refused += 1
    print(len(started), refused)
""")


def host_free_process_slots():
    return int(Path("/proc/sys/kernel/pid_max").read_text()) - len(uids.live_pids())


def proven(oracle):
    """``oracle``, after it contained a benign program that tries to start 200 ``sleep 30``
    children: fewer than max_processes started, the rest were refused, none outlived the check and
    the host still has free process slots. Only then may a test hand it a fork bomb."""
    cap = oracle.limits.max_processes
    if oracle.sandbox_mode == "rlimits" and not ROOT:
        cap *= 2  # the same-uid budget is the caller's task count at construction + 16: it drifts a little
    sandbox = oracle.sandbox
    limits = sandbox.limits
    # The same sandbox, so the same cap; only the wall clock is longer: trying 200 forks can take
    # more than a short test timeout on a loaded machine, and the proof must not be flaky.
    sandbox.limits = dataclasses.replace(limits, timeout_s=max(limits.timeout_s, 30.0))
    try:
        result = oracle.check(SLEEPERS, f"assert 0 < len(started) < {cap} and refused > 0, (len(started), refused)\n")
    finally:
        sandbox.limits = limits
    assert result.passed, f"the process cap did not hold for a benign program; no fork bomb is run: {result}"
    assert_no_sandbox_survivor(oracle)
    assert host_free_process_slots() > 1000
    return oracle


def sandbox_uid_processes(oracle):
    """Live (non-zombie) processes of the sandbox uids: none may outlive a check."""
    if not ROOT:
        return []
    pool = oracle.sandbox._uids
    return [pid for pid in uids.live_pids() if uids.owner(pid) in pool.uids]


def run_cgroups(oracle):
    """Run cgroups this process has left behind: none may outlive a check."""
    cgroups = oracle.sandbox._cgroups
    if cgroups is None:
        return []
    return [p for p in cgroups.parent.iterdir() if p.is_dir() and p.name.startswith(f"{os.getpid()}.")]


def assert_no_sandbox_survivor(oracle):
    deadline = time.monotonic() + 10
    while sandbox_uid_processes(oracle) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_uid_processes(oracle) == []
    assert run_cgroups(oracle) == []


def assert_host_unaffected(oracle):
    """The caller is alive (we are running), no sandbox process or cgroup survives, the host can
    still start processes, and the next check works."""
    assert_no_sandbox_survivor(oracle)
    assert host_free_process_slots() > 1000
    for _ in range(5):
        subprocess.run(["true"], check=True)
    after = oracle.check("def f(x):\n    return x + 1\n", "assert f(1) == 2\n")
    assert after.passed, after


@pytest.fixture
def listener():
    """A TCP server on the host's loopback; after a check it must have no pending connection."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def no_connection_arrived(server):
    time.sleep(0.05)
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False
