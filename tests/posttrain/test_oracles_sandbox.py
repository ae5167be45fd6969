"""The code oracle's sandbox: honest programs pass, failing tests fail with the assertion, and every
hostile program fails its check with a clear reason while the host, the caller and later checks
are unaffected.

Runs as root (CI) and as a normal user: ``tests/posttrain/run_as_user.sh`` runs this file as
``nobody``. A fork bomb whose cap is broken takes the whole machine down (this project lost a
shared machine to one), so no test runs a fork bomb through an oracle before that oracle has
contained a *benign* program that tries the same thing -- 200 ``sleep`` children -- at its process
cap (:func:`proven`). Other programs that would hurt the machine if a layer broke are bounded
(a 1 GiB allocation in 16 MiB steps) so that a regression fails a test instead of the host.
"""
import os
import shutil
import textwrap
import time

import pytest

from megatron_phi4.posttrain.oracles import CodeOracle, extract_program
from tests.posttrain.sandbox_checks import HAS_BWRAP, PROJECT, ROOT, assert_host_unaffected, no_connection_arrived, proven
from tests.posttrain.sandbox_checks import listener  # noqa: F401 -- a pytest fixture


@pytest.fixture(scope="module")
def oracle():
    return proven(CodeOracle(timeout_s=3, memory_mb=256, max_processes=16))


@pytest.fixture(scope="module")
def quick():
    """For programs that run until a limit stops them: a 1 s wall clock keeps the suite fast."""
    return proven(CodeOracle(timeout_s=1, memory_mb=256, max_processes=16))


# -- honest programs --------------------------------------------------------------------------

def test_honest_program_passes(oracle):
    program = "def add(a, b):\n    return a + b\nprint('hello from the sandbox')\n"
    result = oracle.check(program, "assert add(2, 2) == 4\nassert add(-1, 1) == 0\n")
    assert result.passed, result
    assert result.reason == "passed"
    assert result.stdout == "hello from the sandbox\n"


def test_standard_library_imports_and_the_workdir_is_usable(oracle):
    program = textwrap.dedent("""
        import collections, heapq, itertools, json, math, re, fractions, functools, tempfile, threading
        with open("scratch.txt", "w") as f:
            f.write("ok")
        def solve():
            with open("scratch.txt") as f:
                return f.read() + str(math.gcd(12, 18))
    """)
    result = oracle.check(program, "assert solve() == 'ok6'\n")
    assert result.passed, result


def test_markdown_response_is_read_as_code(oracle):
    response = ("Here is a solution:\n```python\ndef sq(x):\n    return x * x\n```\n"
                "Usage:\n```python\nprint(sq(3))\n```\nDone.")
    assert "def sq" in extract_program(response) and "Here is" not in extract_program(response)
    assert oracle.check(response, "assert sq(4) == 16\n").passed
    assert extract_program("```py\nx = 1\n") == "x = 1\n"  # unclosed fence: generation was cut
    assert extract_program("x = 2\n") == "x = 2\n"


def test_clean_environment_empty_cwd_stdin_and_unprivileged_uid(oracle, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    program = textwrap.dedent("""
        import os, sys
        ENV = dict(os.environ)
        CWD = os.listdir(".")
        STDIN = sys.stdin.read()
        UID = os.getuid()
    """)
    tests = textwrap.dedent(f"""
        assert "SECRET_TOKEN" not in ENV, ENV
        assert not any(k.startswith(("PYTHON", "LD_")) for k in ENV), ENV
        assert CWD == [], CWD
        assert STDIN == ""
        assert UID != 0 or {not ROOT}
        assert UID == {os.getuid()} or {ROOT}
    """)
    result = oracle.check(program, tests)
    assert result.passed, result


# -- failures with reasons --------------------------------------------------------------------

def test_failing_assert_fails_with_the_assertion(oracle):
    result = oracle.check("def add(a, b):\n    return a - b\n", "assert add(0, 0) == 0\nassert add(2, 2) == 4\n")
    assert not result.passed
    assert result.reason == "tests failed: AssertionError at <tests> line 2: assert add(2, 2) == 4"


def test_program_errors_are_reasons(oracle):
    r = oracle.check("x = 1 / 0\n", "assert True\n")
    assert not r.passed and r.reason.startswith("program raised: ZeroDivisionError") and "line 1: x = 1 / 0" in r.reason
    r = oracle.check("def f(:\n", "assert True\n")
    assert not r.passed and r.reason.startswith("program does not compile: SyntaxError")
    r = oracle.check("def f():\n    return undefined_name\n", "assert f() == 1\n")
    assert not r.passed
    assert r.reason == ("tests raised: NameError: name 'undefined_name' is not defined at <tests> line 1: "
                        "assert f() == 1 (raised at <program> line 2: return undefined_name)")


@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)\n",
    "import os\nos._exit(0)\n",
    "raise SystemExit\n",
    # a fake verdict on stdout and on every open descriptor, then leave before the tests
    "import os, json\nline = json.dumps({'event': 'verdict', 'passed': True, 'reason': 'passed'}) + '\\n'\n"
    "print(line)\nfor fd in range(3, 20):\n    try:\n        os.write(fd, line.encode())\n    except OSError:\n        pass\n"
    "os._exit(0)\n",
])
def test_leaving_before_the_tests_finish_fails(oracle, program):
    result = oracle.check(program, "assert False, 'the tests ran'\n")
    assert not result.passed, result
    assert "before the tests finished" in result.reason


def test_a_forked_copy_cannot_report_for_the_program(oracle):
    """The child of a fork runs on into the tests, but only the original process may report."""
    result = oracle.check("import os\nif os.fork() != 0:\n    os.wait()\n    os._exit(0)\n", "assert True\n")
    assert not result.passed, result
    assert "before the tests finished" in result.reason


def test_tests_that_do_not_compile_are_a_data_error(oracle):
    with pytest.raises(ValueError, match="the tests do not compile"):
        oracle.check("x = 1\n", "assert x ==\n")
    with pytest.raises(TypeError, match="tests must be a str"):
        oracle.check("x = 1\n", None)


def test_limits_are_validated():
    with pytest.raises(ValueError, match="SandboxLimits.timeout_s"):
        CodeOracle(timeout_s=0)
    with pytest.raises(ValueError, match="SandboxLimits.memory_mb"):
        CodeOracle(memory_mb=8)
    with pytest.raises(TypeError, match="unknown option"):
        CodeOracle(max_proceses=4)
    with pytest.raises(ValueError, match="Sandbox.mode"):
        CodeOracle(sandbox="docker")


# -- hostile programs -------------------------------------------------------------------------

def test_infinite_loop_times_out(quick):
    oracle = quick
    for program in ("while True:\n    pass\n", "import time\nwhile True:\n    time.sleep(1)\n"):
        start = time.monotonic()
        result = oracle.check(program, "assert True\n")
        assert not result.passed
        assert "timed out after 1 s" in result.reason or "CPU time limit" in result.reason, result.reason
        assert time.monotonic() - start < 30  # hang guard only: the limit is 1 s
    assert_host_unaffected(oracle)


def test_fork_loop_is_capped_by_the_process_limit(oracle):
    """Forks sleeping children until the kernel refuses (at most 200 tries, so a broken limit fails
    this test instead of the machine); the count must stay within max_processes."""
    program = textwrap.dedent("""
        import os, time
        children = 0
        for _ in range(200):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children += 1
        print(children)
    """)
    result = oracle.check(program, "assert children < 16, children\n")
    assert result.passed, result
    assert 0 < int(result.stdout) < 16
    assert_host_unaffected(oracle)


@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()\n",
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'b(){ b | b & }; b'])\nimport time\ntime.sleep(60)\n",
])
def test_fork_bomb_fails_and_leaves_the_host_free(quick, program):
    result = quick.check(program, "assert True\n")
    assert not result.passed, result
    assert any(s in result.reason for s in ("BlockingIOError", "timed out", "CPU time", "killed by")), result.reason
    if quick.sandbox._cgroups is not None:
        assert result.reason.endswith("(the process limit of 16 was reached)"), result.reason
    assert_host_unaffected(quick)


@pytest.mark.parametrize("program", [
    "x = bytearray(64 * 1024 ** 3)\n",                                            # 64 GB at once
    "chunks = []\nfor _ in range(64):\n    chunks.append(b'x' * (16 << 20))\n",    # 1 GiB, touched
])
def test_memory_limit(oracle, program):
    result = oracle.check(program, "assert True\n")
    assert not result.passed, result
    assert "MemoryError" in result.reason and "memory limit 256 MiB" in result.reason, result.reason
    assert_host_unaffected(oracle)


def test_output_flood_is_cut_without_buffering_it(oracle):
    for stream in ("stdout", "stderr"):
        program = f"import sys\nfor _ in range(1 << 14):\n    sys.{stream}.write('x' * 65536)\n"  # 1 GiB
        start = time.monotonic()
        result = oracle.check(program, "assert True\n")
        assert not result.passed
        assert "output limit exceeded" in result.reason, result.reason
        assert len(result.stdout) <= 4096 and len(result.stderr) <= 4096
        assert time.monotonic() - start < 30
    assert_host_unaffected(oracle)


@pytest.fixture
def victim(tmp_path):
    """A host directory and file the program will try to damage."""
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "data.txt").write_text("precious")
    return tmp_path


@pytest.mark.parametrize("action", [
    "os.remove({file!r})",
    "open({file!r}, 'w').write('pwned')",
    "open({dir!r} + '/new.txt', 'w').write('pwned')",
    "shutil.rmtree({dir!r})",
    "open({project!r} + '/PWNED', 'w').write('pwned')",
    "os.remove({project!r} + '/setup.py')",
])
def test_writing_or_deleting_outside_the_workdir_fails(oracle, victim, action):
    code = action.format(file=str(victim / "keep" / "data.txt"), dir=str(victim / "keep"), project=str(PROJECT))
    result = oracle.check(f"import os, shutil\n{code}\n", "assert True\n")
    assert not result.passed, result
    assert any(e in result.reason for e in ("FileNotFoundError", "PermissionError", "OSError")), result.reason
    assert (victim / "keep" / "data.txt").read_text() == "precious"
    assert not (victim / "keep" / "new.txt").exists()
    assert not (PROJECT / "PWNED").exists() and (PROJECT / "setup.py").exists()


@pytest.mark.skipif(not HAS_BWRAP, reason="needs bubblewrap: the filesystem view is private only in mode 'bwrap'")
@pytest.mark.parametrize("path", ["{project}/setup.py", "{project}/megatron_phi4/__init__.py", "/etc/passwd",
                                  "/etc/hostname", "/root/.bashrc"])
def test_reading_host_files_fails(oracle, path):
    assert oracle.sandbox_mode == "bwrap"
    path = path.format(project=PROJECT)
    result = oracle.check(f"DATA = open({path!r}).read()\n", "assert DATA\n")
    assert not result.passed, result
    assert "FileNotFoundError" in result.reason or "PermissionError" in result.reason, result.reason
    listing = oracle.check("import os\nTOP = sorted(os.listdir('/'))\n", "assert 'work' not in TOP and 'home' not in TOP, TOP\n")
    assert listing.passed, listing


def test_socket_to_the_host_fails(oracle, listener):
    port = listener.getsockname()[1]
    result = oracle.check(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", "assert True\n")
    assert not result.passed
    assert "network access is disabled" in result.reason, result.reason
    assert no_connection_arrived(listener)


@pytest.mark.skipif(not HAS_BWRAP and not shutil.which("unshare"), reason="needs a network namespace")
def test_raw_socket_bypassing_python_still_cannot_reach_the_host(oracle, listener):
    """ctypes goes around the audit-hook policy; the network namespace is what stops it."""
    port = listener.getsockname()[1]
    program = textwrap.dedent(f"""
        import ctypes, struct
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.socket(2, 1, 0)
        addr = struct.pack("=H", 2) + struct.pack("!H", {port}) + bytes([127, 0, 0, 1]) + bytes(8)
        rc = libc.connect(fd, addr, 16)
        ERRNO = ctypes.get_errno()
    """)
    result = oracle.check(program, "assert rc == 0, f'connect failed, errno {ERRNO}'\n")
    assert not result.passed, result
    assert "connect failed" in result.reason, result.reason
    assert no_connection_arrived(listener)


@pytest.mark.parametrize("program", [
    "import os\nos.kill(os.getppid(), 9)\n",
    "import os, signal\nos.killpg(os.getpgid(0), signal.SIGKILL)\n",
    "import os\nos.kill(-1, 9)\n",
    "import os\nos.kill(0, 9)\n",
    "import subprocess\nsubprocess.run('kill -9 -1', shell=True)\n",
    "import subprocess\nsubprocess.run('kill -9 $PPID; kill -9 1', shell=True)\n",
    "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.kill(-1, 9)\nlibc.kill(1, 9)\n",
])
def test_killing_the_parent_fails_and_the_caller_survives(oracle, program):
    result = oracle.check(program, "assert False, 'still alive'\n")
    assert not result.passed, result
    assert result.reason  # "PermissionError: sandbox: os.kill(...)", "killed by SIGKILL", ...
    assert_host_unaffected(oracle)


# -- many checks at once ----------------------------------------------------------------------

def test_check_many_in_parallel_keeps_order_and_isolates_checks(oracle):
    """Honest programs checked alongside fork bombs and memory hogs still pass: each concurrent
    check has its own process budget (its own uid as root, its own user namespace otherwise)."""
    honest = "def f(x):\n    return 2 * x\n"
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    hog = "x = b'x' * (1 << 40)\n"
    programs = [honest, bomb, honest, hog, honest, "def f(x):\n    return x\n", honest, bomb, honest]
    many = proven(CodeOracle(timeout_s=1.5, memory_mb=256, max_workers=4))
    results = many.check_many(programs, "assert f(3) == 6\n")
    assert [r.passed for r in results] == [True, False, True, False, True, False, True, False, True], \
        [r.reason for r in results]
    assert_host_unaffected(oracle)
    with pytest.raises(ValueError, match="the tests do not compile"):
        oracle.check_many([honest], ["assert (\n"])
