"""The half of the code sandbox that runs *inside* the sandboxed interpreter.

Never imported by the host: ``sandbox.py`` reads this file's text and passes it to
``python -I -B -u -c``. It runs before any model-written code, so everything here is trusted:

1. read the payload (program, tests, limits, nonce, result fd) from stdin, a memfd the host filled,
   then point fd 0 at /dev/null so the program sees an empty stdin;
2. drop to the sandbox uid when the host asks (root callers: bubblewrap starts us as root inside
   its namespaces with only CAP_SETUID/CAP_SETGID, and the kernel only counts processes
   (RLIMIT_NPROC) for non-root users), check that the drop took, and tell the host the uids in
   the "started" event (the host refuses a run that reports the wrong ones);
3. set the resource limits on this process (inherited by every child it forks);
4. install an audit hook that refuses sockets other than AF_UNIX and signals aimed outside the
   program's own processes -- a *policy* layer for clear failure reasons, bypassable with ctypes;
   the namespaces, uid and limits are the boundary;
5. say "started" on the result pipe (the host starts the wall clock then), run the program, then
   the tests, in one namespace (MBPP style), and report the verdict -- only from the original
   process: a forked copy that reaches the end exits silently.

The verdict carries the host's nonce, so printing a fake verdict on stdout does nothing; a program
written against this harness could still find the nonce in memory (it shares the interpreter with
the tests) -- the sandbox contains damage, it does not make reward hacking impossible.
"""
import json
import os
import sys


def _limit(resource, which, value):
    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)  # a process may only lower its hard limit
    resource.setrlimit(which, (value, value))


def _set_limits(p):
    import resource
    uid = p["uid"]
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid):
            raise SystemExit("sandbox: could not drop to uid %d" % uid)  # before any model code
    # Counted per uid (root's host-wide count never applies); the pids cgroup, when the host made
    # one, is the cap that does not depend on the uid.
    _limit(resource, resource.RLIMIT_NPROC, p["max_processes"])
    _limit(resource, resource.RLIMIT_AS, p["memory_bytes"])
    _limit(resource, resource.RLIMIT_FSIZE, p["file_bytes"])
    _limit(resource, resource.RLIMIT_NOFILE, p["max_open_files"])
    _limit(resource, resource.RLIMIT_CORE, 0)
    _limit(resource, resource.RLIMIT_MEMLOCK, 0)
    soft_cpu = p["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (soft_cpu, soft_cpu + 1))  # SIGXCPU, then SIGKILL


def _install_policy():
    parent = os.getppid()

    def hook(event, args):
        if event == "socket.__new__" and args[1] != 1:  # 1 == AF_UNIX; -1 == "default" (AF_INET)
            raise PermissionError("sandbox: network access is disabled (socket family %r)" % (args[1],))
        if event == "os.kill" and (args[0] <= 1 or args[0] == parent):
            raise PermissionError("sandbox: os.kill(%r) would signal processes outside the program"
                                  % (args[0],))
        if event == "os.killpg":
            raise PermissionError("sandbox: os.killpg(%r) is not allowed" % (args[0],))

    sys.addaudithook(hook)


def _where(exc, sources):
    """Where it failed: the outermost line of the tests (which assert), and the innermost line of
    the program or tests when that is somewhere else (where the error was raised)."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name in sources:
            frames.append((name, tb.tb_lineno))
        tb = tb.tb_next
    if not frames and isinstance(exc, SyntaxError) and exc.filename in sources:
        frames.append((exc.filename, exc.lineno or 0))
    if not frames:
        return ""

    def show(frame):
        lines = sources[frame[0]].splitlines()
        text = lines[frame[1] - 1].strip() if 0 < frame[1] <= len(lines) else ""
        return "%s line %d: %s" % (frame[0], frame[1], text[:200])

    outer, inner = frames[0], frames[-1]
    return " at " + show(outer) + ("" if inner == outer else " (raised at " + show(inner) + ")")


def _describe(stage, exc, sources, memory_bytes):
    if isinstance(exc, SystemExit):
        return "%s called exit(%r) before the tests finished" % (stage, exc.code)
    name = type(exc).__name__
    try:
        message = str(exc)[:300]
    except Exception:  # a hostile __str__
        message = "<unprintable>"
    if isinstance(exc, SyntaxError) and exc.filename in sources:
        return "%s does not compile: %s: %s%s" % (stage, name, exc.msg, _where(exc, sources))
    if isinstance(exc, MemoryError):
        message = "memory limit %d MiB" % (memory_bytes >> 20)
    head = "%s failed" % stage if isinstance(exc, AssertionError) and stage == "tests" else "%s raised" % stage
    return "%s: %s%s%s" % (head, name, ": " + message if message else "", _where(exc, sources))


def main():
    payload = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    result_fd = payload["result_fd"]
    os.set_inheritable(result_fd, False)
    nonce = payload["nonce"]
    main_pid = os.getpid()

    def report(event, **fields):
        if os.getpid() != main_pid:
            os._exit(0)  # a forked copy of the program never speaks for it
        fields.update(event=event, nonce=nonce)
        os.write(result_fd, (json.dumps(fields)[:3000] + "\n").encode())

    _set_limits(payload)
    os.chdir(payload["workdir"])
    os.umask(0o077)
    _install_policy()
    import builtins
    program, tests = payload["program"], payload["tests"]
    sources = {"<program>": program, "<tests>": tests}
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    report("started", uids=list(os.getresuid()))
    stage = "program"
    try:
        exec(compile(program, "<program>", "exec"), namespace)
        stage = "tests"
        exec(compile(tests, "<tests>", "exec"), namespace)
    except BaseException as exc:  # noqa: BLE001 -- every way the program can fail is a verdict
        if os.getpid() != main_pid:
            os._exit(0)
        namespace.clear()  # free what the program held (MemoryError) before formatting
        try:
            reason = _describe(stage, exc, sources, payload["memory_bytes"])
        except BaseException:  # noqa: BLE001
            reason = "%s raised %s" % (stage, type(exc).__name__)
        report("verdict", passed=False, reason=reason)
    else:
        report("verdict", passed=True, reason="passed")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    os._exit(0)  # skip atexit handlers and non-daemon threads the program left behind


main()
