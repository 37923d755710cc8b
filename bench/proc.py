"""Processes the coordinator starts: spawned, watched through /proc, spoken
to in JSON lines, and always stopped (SIGTERM, then SIGKILL after a
deadline) and reaped."""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HOST = "127.0.0.1"
POLL = 0.005
#: Clock ticks per second, the unit of utime and stime in /proc/<pid>/stat.
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


_PR_SET_PDEATHSIG = 1


def _child_setup(cpus: set[int] | None) -> Callable[[], None]:
    """What a child does before it runs: die with the coordinator (should
    that be killed outright), and keep to its CPUs."""
    def setup() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


class BenchError(Exception):
    """A scenario could not be run or measured (a deadline passed, a process
    died, an answer was wrong)."""


def free_port() -> int:
    """A port of 127.0.0.1 the kernel just said was free."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def accepting(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    # After the command name: state is field 3, utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def runqueue_seconds(pid: int) -> float:
    """How long the process's threads have waited for a CPU while runnable
    (/proc/<pid>/task/*/schedstat): time other processes took from it."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS), in bytes."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                found[name] = int(value.split()[0]) * 1024
    return found


def wait_until(check: Callable[[], object], what: str, timeout: float,
               alive: Callable[[], None] | None = None, interval: float = POLL,
               error: type[Exception] = BenchError):
    """Poll ``check`` until it returns something true, or raise ``error``
    after ``timeout`` (or as soon as ``alive`` raises). The test suite waits
    with it too (tests/deployed.py), failing with an AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Process:
    """A child process with its output in a log file. With ``control``, its
    stdin and stdout carry JSON lines: commands in, events out."""

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None,
                 control: bool = False, cpus: set[int] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._buffer = b""
        with open(log_path, "ab") as log:
            # Where this process's output begins (a reused --out appends).
            self._log_start = log.tell()
            # A session of its own: Ctrl-C reaches the coordinator only,
            # which then stops everything in order.
            self.popen = subprocess.Popen(
                self.argv, env=env, cwd=cwd,
                stdin=subprocess.PIPE if control else subprocess.DEVNULL,
                stdout=subprocess.PIPE if control else log,
                stderr=log, preexec_fn=_child_setup(cpus), start_new_session=True)
        self.pid = self.popen.pid

    # -- watching -----------------------------------------------------------

    def alive(self) -> None:
        """Raise if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with status {code}; see {self.log_path}")

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def waited(self) -> float:
        return runqueue_seconds(self.pid)

    def memory(self) -> dict[str, int]:
        return memory(self.pid)

    def log(self) -> bytes:
        """What this process has written to its log so far."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_start)
            return f.read()

    # -- JSON lines -------------------------------------------------------

    def send(self, message: dict) -> None:
        try:
            self.popen.stdin.write(json.dumps(message).encode() + b"\n")
            self.popen.stdin.flush()
        except BrokenPipeError:
            raise BenchError(f"{self.name} is gone; see {self.log_path}") from None

    def receive(self, event: str, timeout: float) -> dict:
        """The next message from the process, which must be ``event`` (an
        ``error`` event raises with the process's own words)."""
        deadline = time.monotonic() + timeout
        stdout = self.popen.stdout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"timed out after {timeout:g} s waiting for {self.name} "
                                 f"to say {event!r}")
            ready, _, _ = select.select([stdout], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(stdout.fileno(), 1 << 20)
                if not chunk:
                    self.popen.wait(timeout=5)
                    raise BenchError(f"{self.name} exited (status {self.popen.returncode}) "
                                     f"before saying {event!r}; see {self.log_path}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message = json.loads(line)
        if message.get("event") == "error":
            raise BenchError(f"{self.name}: {message.get('error')}")
        if message.get("event") != event:
            raise BenchError(f"{self.name} said {message.get('event')!r}, expected {event!r}")
        return message

    def ready(self) -> bool:
        """Whether a whole line is waiting to be received (no blocking)."""
        if b"\n" in self._buffer:
            return True
        stdout = self.popen.stdout
        while select.select([stdout], [], [], 0)[0]:
            chunk = os.read(stdout.fileno(), 1 << 20)
            if not chunk:
                return True  # receive() will say that it exited
            self._buffer += chunk
            if b"\n" in self._buffer:
                return True
        return False

    def call(self, message: dict, event: str, timeout: float) -> dict:
        self.send(message)
        return self.receive(event, timeout)

    # -- stopping -----------------------------------------------------------

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM,
             grace: float = 3.0) -> int | None:
        """Stop it and reap it: a controlled process is first asked by the end
        of its stdin (``grace`` seconds), then it gets ``sig``, and after
        ``timeout`` more seconds SIGKILL. Returns its exit status."""
        popen = self.popen
        if popen.stdin is not None and not popen.stdin.closed:
            try:
                popen.stdin.close()
            except OSError:
                pass
            try:
                popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        if popen.poll() is None:
            try:
                popen.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"  ! {self.name} (pid {self.pid}) did not stop within {timeout:g} s "
                      "of a signal; killing it", file=sys.stderr)
                popen.kill()
                popen.wait(timeout=10)
        if popen.stdout is not None:
            popen.stdout.close()
        return popen.returncode


def sleep_until(deadline: float) -> None:
    left = deadline - time.monotonic()
    if left > 0:
        time.sleep(left)
