"""The sandbox's layers: the process cap (a pids cgroup per run for root callers, the sandbox uid's
RLIMIT_NPROC behind it) and the degraded modes, which must say what they lack and still contain
what they can. Every fork bomb here runs only after :func:`proven` contained a benign process flood
with the same oracle."""
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from megatron_phi4.posttrain.oracles import CodeOracle, pids_cgroup
from megatron_phi4.posttrain.oracles import sandbox as sandbox_module
from tests.posttrain.sandbox_checks import (HAS_BWRAP, ROOT, SLEEPERS, assert_host_unaffected,
                                            assert_no_sandbox_survivor, no_connection_arrived, proven)
from tests.posttrain.sandbox_checks import listener  # noqa: F401 -- a pytest fixture


@pytest.fixture(scope="module")
def oracle():
    return proven(CodeOracle(timeout_s=3, memory_mb=256, max_processes=16))


# -- the process cap: a pids cgroup per run (root), the uid's RLIMIT_NPROC ---------------------

HAS_PIDS_CGROUP = pids_cgroup.find_pids_hierarchy(Path("/proc/self/mountinfo").read_text(),
                                                  Path("/proc/self/cgroup").read_text())[0] is not None
needs_cgroup = pytest.mark.skipif(not (ROOT and HAS_PIDS_CGROUP), reason="pids cgroups are for root callers "
                                  "on machines with a pids cgroup hierarchy")


def _spy_on_cgroups(monkeypatch):
    made = []
    create = pids_cgroup.PidsCgroups.create

    def spy(self, max_tasks):
        made.append(create(self, max_tasks))
        return made[-1]
    monkeypatch.setattr(pids_cgroup.PidsCgroups, "create", spy)
    return made


@needs_cgroup
def test_each_root_run_is_in_its_own_pids_cgroup_which_is_then_removed(oracle, monkeypatch):
    made = _spy_on_cgroups(monkeypatch)
    peak = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            if made:
                peak.append(made[-1].tasks())
            time.sleep(0.02)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = oracle.check("import subprocess, time\nkids = [subprocess.Popen(['sleep', '30']) for _ in range(3)]\n"
                              "time.sleep(0.5)\n", "assert len(kids) == 3\n")
    finally:
        done.set()
        watcher.join()
    assert result.passed, result
    assert len(made) == 1 and made[0].max_tasks == 16 + sandbox_module.HELPER_TASKS[oracle.sandbox_mode]
    assert max(peak) >= 4  # the program and its three children were counted in it
    assert not made[0].path.exists()  # the sleepers were killed and the cgroup removed
    assert made[0].path.parent == oracle.sandbox._cgroups.parent
    own = Path("/proc/self/cgroup").read_text()
    assert pids_cgroup.PARENT_NAME not in own  # the caller itself is not in any sandbox cgroup


@needs_cgroup
def test_the_pids_cgroup_caps_on_its_own(monkeypatch):
    """With pids.max below what RLIMIT_NPROC allows, the cgroup is what stops the sleepers: the
    cap does not depend on the uid drop."""
    monkeypatch.setattr(sandbox_module, "HELPER_TASKS", {m: n - 6 for m, n in sandbox_module.HELPER_TASKS.items()})
    capped = CodeOracle(timeout_s=3, memory_mb=256, max_processes=16)
    result = capped.check(SLEEPERS, "assert refused > 0\n")
    assert result.passed, result
    # pids.max leaves 10 tasks to the program, one of them its interpreter; RLIMIT_NPROC would allow 31
    assert 0 < int(result.stdout.split()[0]) <= 9, result.stdout
    assert_no_sandbox_survivor(capped)


@pytest.mark.skipif(not ROOT, reason="root callers only")
def test_without_a_pids_cgroup_root_says_so_and_the_uid_limit_still_caps(monkeypatch, caplog):
    def unavailable():
        raise pids_cgroup.PidsCgroupUnavailable("no hierarchy in this test")
    monkeypatch.setattr(pids_cgroup, "host_cgroups", unavailable)
    caplog.set_level("WARNING")
    sandbox_module._WARNED.clear()
    degraded = CodeOracle(timeout_s=1, memory_mb=256, max_processes=16)
    assert degraded.sandbox._cgroups is None
    assert "no pids cgroup (no hierarchy in this test)" in degraded.sandbox.note
    assert any("no pids cgroup" in r.message for r in caplog.records)
    proven(degraded)  # 200 sleepers stopped by RLIMIT_NPROC of the sandbox uid alone
    bomb = degraded.check("import os\nwhile True:\n    os.fork()\n", "assert True\n")
    assert not bomb.passed and "[sandbox: no pids cgroup" in bomb.reason, bomb.reason
    assert_host_unaffected(degraded)
    with pytest.raises(sandbox_module.SandboxUnavailable, match="no pids cgroup"):
        CodeOracle(pids_cgroup=True)


def test_the_uid_drop_is_checked_by_the_host(oracle, monkeypatch):
    """A harness that reported the wrong uids (a broken drop) is refused, never run quietly."""
    if not ROOT:
        pytest.skip("only root callers drop to a sandbox uid")
    monkeypatch.setattr(sandbox_module, "_CHILD_SOURCE", sandbox_module._CHILD_SOURCE.replace(
        'report("started", uids=list(os.getresuid()))', 'report("started", uids=[0, 0, 0])'))
    with pytest.raises(sandbox_module.SandboxError, match="runs the program as uids \\[0, 0, 0\\], not as 6"):
        oracle.check("x = 1\n", "assert x == 1\n")


@needs_cgroup
def testrun_cgroups_of_dead_callers_are_removed():
    cgroups = pids_cgroup.host_cgroups()
    stale = cgroups.parent / "999999999.12345.0"  # a pid above pid_max: its creator is surely gone
    stale.mkdir()
    try:
        pids_cgroup.PidsCgroups(cgroups.hierarchy)
        assert not stale.exists()
    finally:
        if stale.exists():
            stale.rmdir()


def test_finding_the_pids_hierarchy(tmp_path):
    v1 = ("39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
          "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")
    found, _ = pids_cgroup.find_pids_hierarchy(v1, "8:pids:/ci/job7\n0::/\n")
    assert found == pids_cgroup.Hierarchy(1, "/sys/fs/cgroup/pids", "/", "/ci/job7")
    assert found.directory("/ci/job7") == Path("/sys/fs/cgroup/pids/ci/job7")
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    v2 = f"30 25 0:26 / {tmp_path} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    found, _ = pids_cgroup.find_pids_hierarchy(v2, "0::/user.slice/session-1.scope\n")
    assert found == pids_cgroup.Hierarchy(2, str(tmp_path), "/", "/user.slice/session-1.scope")
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    found, why = pids_cgroup.find_pids_hierarchy(v2, "0::/\n")
    assert found is None and "no cgroup v2 mount offers the pids controller" in why
    found, why = pids_cgroup.find_pids_hierarchy("", "0::/\n")
    assert found is None and "no cgroup v1 'pids' hierarchy" in why


def test_cgroup_v2_setup_and_removal_on_a_simulated_tree(tmp_path, monkeypatch):
    """cgroup v2 (not mounted with pids on the machines this was written on): the parent lets its
    children have the pids controller, a run gets pids.max, removal kills through cgroup.kill.
    The kernel's side -- control files appearing on mkdir, rmdir of a cgroup -- is simulated."""
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("memory\n")
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if tmp_path in self.parents:
            for name in ("cgroup.procs", "cgroup.subtree_control", "cgroup.kill", "pids.max", "pids.events"):
                if not (self / name).exists():
                    (self / name).write_text("")
    killed = []
    real_rmdir = os.rmdir

    def rmdir(path):
        if tmp_path not in Path(path).parents:
            return real_rmdir(path)
        killed.append((Path(path) / "cgroup.kill").read_text())
        for control in Path(path).iterdir():
            control.unlink()
        real_rmdir(path)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(pids_cgroup.os, "rmdir", rmdir)
    cgroups = pids_cgroup.PidsCgroups(pids_cgroup.Hierarchy(2, str(tmp_path), "/", "/"))
    assert cgroups.parent == tmp_path / pids_cgroup.PARENT_NAME
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+pids"
    assert (cgroups.parent / "cgroup.subtree_control").read_text() == "+pids"
    run = cgroups.create(18)
    assert (run.path / "pids.max").read_text() == "18"
    assert run.destroy() and not run.path.exists()
    assert killed == ["1"]
    assert pids_cgroup.join_argv(run, ["bwrap", "x"])[-3:] == [str(run.path / "cgroup.procs"), "bwrap", "x"]


# -- degraded modes -----------------------------------------------------------------------------

def _python_for_degraded_modes():
    """The degraded modes run the interpreter from the host's filesystem under the sandbox uid; as
    root that needs one every user can read (pyenv under /root is not)."""
    candidates = [sandbox_module._base_interpreter()[0], "/usr/bin/python3"]
    for python in candidates:
        if os.path.exists(python) and (not ROOT or sandbox_module._world_readable(os.path.realpath(python)) is None):
            try:
                prefix = sandbox_module._interpreter_prefix(python)
            except sandbox_module.SandboxUnavailable:
                continue
            if not ROOT or sandbox_module._world_readable(prefix) is None:
                return python
    return None


DEGRADED_PYTHON = _python_for_degraded_modes()


@pytest.mark.skipif(DEGRADED_PYTHON is None, reason="no interpreter an unprivileged uid can run")
@pytest.mark.parametrize("mode", ["unshare", "rlimits"])
def test_degraded_modes_say_so_and_still_contain_what_they_can(mode, caplog, listener):
    if mode == "unshare" and not shutil.which("unshare"):
        pytest.skip("util-linux unshare is not installed")
    caplog.set_level("WARNING")
    sandbox_module._WARNED.clear()
    try:
        oracle = CodeOracle(timeout_s=1, memory_mb=256, sandbox=mode, python=DEGRADED_PYTHON)
    except sandbox_module.SandboxUnavailable as exc:
        pytest.skip(f"mode {mode!r} cannot run here: {exc}")
    assert oracle.sandbox_mode == mode
    assert any("code sandbox runs degraded" in r.message and mode in r.message for r in caplog.records)
    proven(oracle)
    ok = oracle.check("def f():\n    return 1\n", "assert f() == 1\n")
    assert ok.passed and ok.reason.startswith("passed [sandbox: " + mode), ok.reason

    hostile = {
        "loop": "while True:\n    pass\n",
        "memory": "x = bytearray(64 * 1024 ** 3)\n",
        "fork bomb": "import os\nwhile True:\n    os.fork()\n",
        "flood": "import sys\nfor _ in range(1 << 14):\n    sys.stdout.write('x' * 65536)\n",
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), timeout=2)\n",
        "kill parent": "import os\nos.kill(os.getppid(), 9)\n",
    }
    if ROOT or mode == "unshare":  # an unsandboxed same-uid program can kill the caller: not tried
        hostile["kill -1"] = "import subprocess\nsubprocess.run('kill -9 -1', shell=True)\n"
    for name, program in hostile.items():
        result = oracle.check(program, "assert False, 'survived'\n")
        assert not result.passed, (name, result)
        assert f"[sandbox: {mode}" in result.reason, (name, result.reason)
    assert no_connection_arrived(listener)
    capped = oracle.check("import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
                          "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n"
                          "        os._exit(0)\n    n += 1\n", "assert n < 40, n\n")  # 16, give or take
    # the caller's other processes come and go in the non-root rlimits mode
    assert capped.passed, capped.reason
    assert_host_unaffected(oracle)


@pytest.mark.skipif(ROOT or DEGRADED_PYTHON is None, reason="the same-uid mode is what a non-root caller gets")
def test_same_uid_mode_has_one_fixed_process_budget_and_runs_take_turns():
    """Without namespaces a non-root caller's programs run as its own uid, so RLIMIT_NPROC counts
    the caller's tasks too. A budget measured per run would grow with every overlapping run (each
    counting the others' processes as the caller's); it is fixed once instead, and runs take turns."""
    same_uid = CodeOracle(timeout_s=5, memory_mb=256, sandbox="rlimits", python=DEGRADED_PYTHON, max_workers=4)
    program = ("import resource, time\nNPROC = resource.getrlimit(resource.RLIMIT_NPROC)[0]\n"
               "START = time.time()\ntime.sleep(0.3)\nprint(NPROC, START, time.time())\n")
    results = same_uid.check_many([program] * 4, "assert NPROC > 0\n")
    assert all(r.passed for r in results), [r.reason for r in results]
    rows = sorted(tuple(float(x) for x in r.stdout.split()) for r in results)
    assert {row[0] for row in rows} == {same_uid.sandbox._same_uid_nproc}
    assert all(later[1] >= earlier[2] for earlier, later in zip(rows, rows[1:])), rows  # no overlap


def test_insisting_on_an_unavailable_mode_raises(monkeypatch):
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox_module, "_PROBED", {})
    with pytest.raises(sandbox_module.SandboxUnavailable, match="bwrap is not installed"):
        CodeOracle(sandbox="bwrap")


@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap is not installed (apt-get install -y bubblewrap)")
def test_auto_mode_uses_bubblewrap_when_installed(oracle):
    assert oracle.sandbox_mode == "bwrap"
    assert oracle.sandbox.note == ""
