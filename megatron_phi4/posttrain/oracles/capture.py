"""What the host reads from a sandbox: its stdout, stderr and result pipe, capped, and a reason
for a sandbox that ended without a verdict.

A program that prints a gigabyte must cost the caller no more than the cap: the host reads the
pipes itself (never ``communicate()``, which buffers everything), keeps at most ``cap`` bytes of
each, and reports an overflow as soon as the total passes the cap, so the run is killed then.
"""
from __future__ import annotations

import json
import os
import shutil
import signal


class OutputCapture:
    """Reads the sandbox's pipes without ever holding more than ``cap`` bytes of any of them: a
    program that prints a gigabyte costs the caller ``cap`` bytes and is killed."""

    def __init__(self, fds: dict[str, int], cap: int):
        self.cap = cap
        self.fds = list(fds.values())
        self._name = {fd: name for name, fd in fds.items()}
        self._data = {name: bytearray() for name in fds}
        self._size = dict.fromkeys(fds, 0)
        for fd in self.fds:
            os.set_blocking(fd, False)

    def read(self, fd: int) -> bool:
        """Read what is there; False at end of file."""
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        name = self._name[fd]
        self._size[name] += len(chunk)
        room = self.cap - len(self._data[name])
        if room > 0:
            self._data[name] += chunk[:room]
        return True

    def drain(self) -> None:
        """Read what the pipes hold now (not what may come later), stopping at the cap."""
        for fd in self.fds:
            while self.overflow() is None:
                before = self._size[self._name[fd]]
                if not self.read(fd) or self._size[self._name[fd]] == before:
                    break

    def overflow(self) -> str | None:
        if self._size["stdout"] + self._size["stderr"] > self.cap:
            return f"output limit exceeded: more than {self.cap} bytes on stdout/stderr"
        if self._size["result"] > self.cap:
            return f"output limit exceeded: more than {self.cap} bytes on the result pipe"
        return None

    def text(self, name: str) -> str:
        return self._data[name].decode("utf-8", "replace")

    def event(self, kind: str, nonce: str) -> dict | None:
        """The last complete result-pipe line of ``kind`` that carries the nonce."""
        found = None
        for line in bytes(self._data["result"]).split(b"\n")[:-1]:
            try:
                event = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(event, dict) and event.get("nonce") == nonce and event.get("event") == kind:
                found = event
        return found


def describe_exit(rc: int | None, mode: str, stderr: str) -> str:
    """A reason for a sandbox that ended without a verdict."""
    sig = None
    if rc is not None and rc < 0:
        sig = -rc
    elif rc is not None and mode in ("bwrap", "unshare") and rc > 128:
        sig = rc - 128  # bwrap and sh report a child killed by signal N as 128 + N
    tail = stderr.strip().splitlines()[-1][:300] if stderr.strip() else ""
    if sig == signal.SIGXCPU or sig == signal.SIGKILL and "CPU" in tail:
        return "CPU time limit exceeded"
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name} before the tests finished" + (f" ({tail})" if tail else "")
    return f"exited with status {rc} before the tests finished" + (f" ({tail})" if tail else "")


def remove_tree(path: str) -> None:
    def unlock(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=unlock)
