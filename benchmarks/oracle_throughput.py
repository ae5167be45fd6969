#!/usr/bin/env python
"""Code-oracle throughput: sandboxed checks per second against the honest baseline, in one process.

Sandboxed: ``CodeOracle.check`` one at a time, and ``CodeOracle.check_many`` with ``--workers``
sandboxes at once. Baseline: what an unsandboxed oracle does -- ``subprocess.run([python, "-c",
program + tests], timeout=...)``, pass == exit status 0 -- one at a time and on a thread pool of
the same size, with the sandbox's clean environment (the caller's can slow an interpreter's
start-up, which is not the cost of isolation). Sandbox and baseline alternate in ``--rounds``
blocks per row, so a load that drifts during the run weighs on both alike. Programs:

* honest  -- an MBPP-style function and three asserts (passes);
* failing -- the same with a wrong assert (fails on the assertion);
* hostile -- a rotation of fork bomb, 64 GB allocation and 1 GiB of output (each fails at its limit).

A hostile program must never run bare: a fork bomb without a hard process cap fills the machine's
pid table -- as root RLIMIT_NPROC does not apply at all, and ``subprocess.run``'s timeout kills only
the first process, not its descendants. (An earlier draft of this script did exactly that and took
a shared machine down.) So the hostile baseline is "bare but capped": the same interpreter, no
namespaces, no harness, inside a pids cgroup of its own (``max_processes`` tasks) with the sandbox's
RLIMIT_AS and RLIMIT_CPU (via ``prlimit``), output read up to the same cap, and the cgroup emptied
afterwards. That needs root; without root the hostile baseline is skipped, not run uncapped. Before
any hostile row, both sides must first contain a benign program that tries to start 200 ``sleep``
children; the script stops if either lets more than ``max_processes`` run.

Timeouts are not measured: an infinite loop costs ``timeout_s`` whatever the sandbox.

    python benchmarks/oracle_throughput.py               # 50 checks per row, 4 workers
    python benchmarks/oracle_throughput.py --checks 200 --workers 8
"""
from __future__ import annotations

import argparse
import os
import selectors
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from megatron_phi4.posttrain.oracles import CodeOracle  # noqa: E402
from megatron_phi4.posttrain.oracles import pids_cgroup  # noqa: E402

HONEST = ("def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))\n",
          "assert similar_elements((3, 4, 5, 6), (5, 7, 4, 10)) == (4, 5)\n"
          "assert similar_elements((1, 2, 3, 4), (5, 4, 3, 7)) == (3, 4)\n"
          "assert similar_elements((11, 12, 14, 13), (17, 15, 14, 13)) == (13, 14)\n")
FAILING = (HONEST[0], HONEST[1] + "assert similar_elements((1,), (1,)) == (2,)\n")
HOSTILE = [
    ("import os\nwhile True:\n    os.fork()\n", "assert True\n"),
    ("x = bytearray(64 * 1024 ** 3)\n", "assert True\n"),
    ("import sys\nfor _ in range(1 << 14):\n    sys.stdout.write('x' * 65536)\n", "assert True\n"),
]
SLEEPERS = ("import subprocess\nstarted = []\nfor _ in range(200):\n    try:\n"
            "        started.append(subprocess.Popen(['sleep', '30']))\n    except OSError:\n        pass\n"
            "print(len(started), flush=True)\n")


# The sandbox's environment, so that the interpreters start alike: the caller's environment can
# make start-up slower (measured here: 270 vs 207 ms under load) and that is not isolation's cost.
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
             "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def bare_check(python: str, program: str, tests: str, timeout_s: float) -> bool:
    """The honest baseline: no isolation at all. Honest and failing programs only."""
    try:
        out = subprocess.run([python, "-c", program + "\n" + tests], stdout=subprocess.PIPE, env=CLEAN_ENV,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0


class CappedBare:
    """Bare interpreter under the sandbox's hard caps only: a pids cgroup, RLIMIT_AS, RLIMIT_CPU,
    the output cap, the wall clock. For hostile programs; root only (the cgroup)."""

    def __init__(self, python: str, oracle: CodeOracle):
        self.python, self.limits = python, oracle.limits
        self.cgroups = pids_cgroup.host_cgroups()

    def run(self, program: str, tests: str) -> tuple[bool, bytes]:
        limits = self.limits
        cgroup = self.cgroups.create(limits.max_processes)
        argv = pids_cgroup.join_argv(cgroup, [
            "prlimit", f"--as={limits.memory_mb << 20}", f"--cpu={limits.cpu_seconds}",
            f"--fsize={limits.max_file_mb << 20}", "--core=0", "--",
            self.python, "-c", program + "\n" + tests])
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=CLEAN_ENV, start_new_session=True)
        kept, seen, deadline = bytearray(), 0, time.monotonic() + limits.timeout_s
        pidfd, out = os.pidfd_open(proc.pid), proc.stdout.fileno()
        os.set_blocking(out, False)
        rc = None
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(out, selectors.EVENT_READ)
                selector.register(pidfd, selectors.EVENT_READ)
                while seen <= limits.max_output_bytes and time.monotonic() < deadline:
                    ready = {key.fd for key, _ in selector.select(timeout=deadline - time.monotonic())}
                    while out in ready and seen <= limits.max_output_bytes:  # what is in the pipe now
                        try:
                            chunk = os.read(out, 1 << 16)
                        except BlockingIOError:
                            break
                        if not chunk:  # end of file
                            selector.unregister(out)
                            ready.discard(out)
                            break
                        seen += len(chunk)
                        kept += chunk[:max(0, limits.max_output_bytes - len(kept))]
                    if pidfd in ready:  # the program's first process is done; what it left behind is killed
                        rc = proc.wait()
                        break
        finally:
            os.close(pidfd)
            if rc is None:  # not reaped yet, so its process group id cannot have been reused
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            proc.stdout.close()
            cgroup.destroy()  # whatever the program left behind, wherever it went in the tree
        return rc == 0 and seen <= limits.max_output_bytes, bytes(kept)


def timed(fn, items, workers: int):
    start = time.perf_counter()
    if workers == 1:
        results = [fn(item) for item in items]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(fn, items))
    return time.perf_counter() - start, results


def prove_caps(oracle: CodeOracle, capped: CappedBare | None) -> None:
    """Both sides must stop a benign process flood at the cap before they get a fork bomb."""
    cap = oracle.limits.max_processes
    result = oracle.check(SLEEPERS, f"assert len(started) < {cap}, len(started)\n")
    if not result.passed:
        sys.exit(f"the sandbox did not cap a benign process flood ({result.reason}); no hostile rows run")
    if capped is not None:
        _, out = capped.run(SLEEPERS, "")
        started = int(out.split()[0]) if out.split() else -1
        if not 0 < started < cap:
            sys.exit(f"the capped baseline started {started} processes (cap {cap}); no hostile rows run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", type=int, default=50, help="checks per row (default 50)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent checks for the batch rows (default 4)")
    parser.add_argument("--timeout-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=5, help="alternating sandbox/baseline blocks per row (default 5)")
    args = parser.parse_args()

    oracle = CodeOracle(timeout_s=args.timeout_s, memory_mb=512, max_workers=args.workers)
    python = oracle.sandbox._python
    try:
        capped = CappedBare(python, oracle) if os.geteuid() == 0 else None
        why_not = "" if capped else "not root: no pids cgroup for it"
    except pids_cgroup.PidsCgroupUnavailable as exc:
        capped, why_not = None, str(exc)
    print(f"sandbox mode: {oracle.sandbox_mode}{' (' + oracle.sandbox.note + ')' if oracle.sandbox.note else ''}; "
          f"pids cgroup per run: {oracle.sandbox._cgroups is not None}; uid {os.geteuid()}; python {python}; "
          f"{len(os.sched_getaffinity(0))} CPUs; load {os.getloadavg()[0]:.1f}; {args.checks} checks per row")
    print(f"{'programs':8s} {'how':>11s} {'sandbox ms/check':>17s} {'checks/s':>9s} "
          f"{'baseline ms/check':>18s} {'checks/s':>9s} {'sandbox/baseline':>17s}  baseline")
    for name, cases in (("honest", [HONEST]), ("failing", [FAILING]), ("hostile", HOSTILE)):
        items = [cases[i % len(cases)] for i in range(args.checks)]
        expect = name == "honest"
        if name == "hostile":
            prove_caps(oracle, capped)
        for workers in (1, args.workers):
            def sandboxed(block):
                if workers == 1:
                    return [oracle.check(*item).passed for item in block]
                return [r.passed for r in oracle.check_many([p for p, _ in block], [t for _, t in block])]
            if name != "hostile":
                baseline = lambda item: bare_check(python, *item, args.timeout_s)  # noqa: E731
                label = "bare subprocess.run"
            elif capped is not None:
                baseline = lambda item: capped.run(*item)[0]  # noqa: E731
                label = "bare, in a pids cgroup + rlimits + output cap"
            else:
                baseline, label = None, f"not run ({why_not}); never run uncapped"
            # Sandbox and baseline alternate in blocks, so that a load that changes during the
            # run (a shared machine) weighs on both sides alike.
            s_time = b_time = 0.0
            s_results, b_results = [], []
            size = max(1, len(items) // args.rounds)
            for block in (items[i:i + size] for i in range(0, len(items), size)):
                start = time.perf_counter()
                s_results += sandboxed(block)
                s_time += time.perf_counter() - start
                if baseline is not None:
                    elapsed, results = timed(baseline, block, workers)
                    b_time += elapsed
                    b_results += results
            assert all(r == expect for r in s_results), f"sandbox got a wrong verdict on {name}"
            assert all(r == expect for r in b_results), f"baseline got a wrong verdict on {name}"
            n = len(items)
            how = "1 at a time" if workers == 1 else f"{workers} workers"
            row = f"{name:8s} {how:>11s} {1e3 * s_time / n:17.1f} {n / s_time:9.1f} "
            if baseline is None:
                print(row + f"{'-':>18s} {'-':>9s} {'-':>17s}  {label}")
            else:
                print(row + f"{1e3 * b_time / n:18.1f} {n / b_time:9.1f} {s_time / b_time:16.2f}x  {label}")
    print(f"load at the end: {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    main()
