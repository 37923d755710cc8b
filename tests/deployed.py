"""``twistd redmessenger`` as deployed: the installed command and plugin, run
as a subprocess from a fresh directory (not the repository) with no
PYTHONPATH, so that what runs is what ``pip install`` put in the venv; and
blocking WebSocket clients to talk to it from outside the reactor.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from network import HOST, accepting
from resp import RedisReplyError, RespClient

# bench/ is not installed: like ``python -m pytest`` and ``python -m bench``
# run from the repository's root, import it from there.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from bench.proc import wait_until  # noqa: E402

#: The test venv's own twistd, so it runs the package installed there.
TWISTD = Path(sys.executable).with_name("twistd")
#: How long a twistd gets to start listening, and to exit after SIGTERM.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
#: How long a client waits for a frame it expects.
RECV_TIMEOUT = 10.0
#: How long a startup failure may take to be reported.
FAIL_TIMEOUT = 30.0
#: How long a twistd that cannot listen gets to give up.
GIVE_UP_TIMEOUT = 10.0
POLL_INTERVAL = 0.02

#: The log line service.py writes last in a complete stop.
STOPPED = "RedMessenger stopped"
#: The log line subscriber.py writes once its PSUBSCRIBE is confirmed (and
#: a lone node has taken the storer partition: membership.py).
SUBSCRIBED = "Subscribed to ['rm.groups.*', 'rm.presence.*', 'rm.users.*']"


def deployed_env(**extra: str) -> dict[str, str]:
    """The test's environment without PYTHONPATH, so the repository (or
    whatever a developer pointed it at) cannot shadow the installed package."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env.update(extra)
    return env


def wait_for(
    check: Callable[[], Any],
    what: str,
    timeout: float = RECV_TIMEOUT,
    alive: Callable[[], None] | None = None,
) -> Any:
    """Poll ``check`` until it returns something true; fail after ``timeout``
    (or as soon as ``alive`` raises, for a process that died meanwhile)."""
    return wait_until(check, what, timeout, alive, interval=POLL_INTERVAL, error=AssertionError)


def running_pid(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its reaper is
    not: it no longer holds ports or files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def stop_stray(pid: int) -> None:
    """Stop a process that is not our child (the twistd's redis-server),
    should a failed test have left it behind: SIGTERM, then SIGKILL after a
    deadline. It is reaped by its parent or by init, not by us."""
    if not running_pid(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while running_pid(pid) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
    if running_pid(pid):
        os.kill(pid, signal.SIGKILL)


def children(pid: int) -> set[int] | None:
    """The child processes of ``pid``, or ``None`` where /proc cannot tell."""
    found: set[int] = set()
    tasks = Path(f"/proc/{pid}/task")
    try:
        for task in tasks.iterdir():
            found.update(int(child) for child in (task / "children").read_text().split())
    except OSError:
        return None
    return found


def server_pid(redis: RespClient) -> int:
    info = redis.command("INFO", "server", decode=True)
    return int(re.search(r"^process_id:(\d+)", info, re.MULTILINE).group(1))


def numpat(redis: RespClient) -> int:
    try:
        return redis.command("PUBSUB", "NUMPAT")
    except (OSError, RedisReplyError):
        return -1


def append_only_files(data_dir: Path) -> list[Path]:
    """Redis 6 writes appendonly.aof, Redis 7 an appendonlydir/ of files."""
    return [*data_dir.glob("appendonly*.aof"), *data_dir.glob("appendonlydir/*")]


class TwistdProcess:
    """One ``twistd`` run: started in ``cwd`` with its log in ``log_path``,
    and always stopped (SIGTERM, then SIGKILL after a deadline) and reaped
    when the ``with`` block ends."""

    def __init__(
        self, args: list[str], cwd: Path, log_path: Path, env: dict[str, str] | None = None,
        twistd: str | None = None,
    ) -> None:
        """``twistd``: another venv's (default: this one's)."""
        self.args = args
        self.log_path = log_path
        self._terminated = False
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [twistd or str(TWISTD), *args],
                cwd=cwd,
                env=env or deployed_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def __enter__(self) -> TwistdProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> None:
        """Fail, showing the log, if twistd has exited."""
        if self.process.poll() is not None:
            raise AssertionError(
                f"twistd {' '.join(self.args)} exited with code "
                f"{self.process.returncode}:\n{self.log()}"
            )

    def wait_accepting(self, port: int) -> None:
        wait_for(
            lambda: accepting(port), f"twistd to accept on port {port}", START_TIMEOUT, self.alive
        )

    def wait_subscribed(self, redis: RespClient | None = None) -> None:
        """Until its PSUBSCRIBE is confirmed (a PUBLISH before that is lost):
        on a Redis of its own, until Redis counts the three patterns and
        twistd logs it (it takes the storer partition in between); on a
        shared one, whose count other subscribers may change, until twistd
        logs it."""
        if redis is not None:
            wait_for(
                lambda: numpat(redis) == 3 and SUBSCRIBED in self.log(),
                "RedMessenger to PSUBSCRIBE",
                START_TIMEOUT,
                self.alive,
            )
        else:
            wait_for(
                lambda: SUBSCRIBED in self.log(),
                "RedMessenger to PSUBSCRIBE",
                START_TIMEOUT,
                self.alive,
            )

    def terminate(self) -> None:
        """SIGTERM, once: a second one, while the first stop is under way,
        makes Twisted log a ReactorNotRunning traceback."""
        if not self._terminated and self.process.poll() is None:
            self._terminated = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        """SIGTERM, and wait for the exit; kill it and fail if it hangs."""
        self.terminate()
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"twistd did not exit within {STOP_TIMEOUT:g} s of SIGTERM:\n{self.log()}"
            ) from None

    def assert_stopped_cleanly(self) -> None:
        """Exited after SIGTERM having stopped every part of the service.

        twistd ends a SIGTERMed run by killing itself with SIGTERM once the
        reactor has stopped (Twisted's ``_exitWithSignal``), so that a
        supervisor sees how it ended: the status is -SIGTERM (143 in a shell),
        not 0. The log line proves the stop was complete rather than a bare
        death by signal.
        """
        code = self.process.returncode
        log = self.log()
        assert code in (0, -signal.SIGTERM), f"exit status {code}:\n{log}"
        assert STOPPED in log, f"the service did not finish stopping:\n{log}"
        assert "Traceback" not in log, log


def recv_json(ws: ClientConnection) -> dict:
    return json.loads(ws.recv(timeout=RECV_TIMEOUT))


def hello(ws: ClientConnection, doc: dict | str) -> dict:
    ws.send(doc if isinstance(doc, str) else json.dumps(doc))
    welcome = recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return welcome


@contextmanager
def client(port: int) -> Iterator[ClientConnection]:
    with connect(
        f"ws://{HOST}:{port}/", open_timeout=RECV_TIMEOUT, close_timeout=RECV_TIMEOUT, max_size=None
    ) as ws:
        yield ws


def ws(url: str, **kwargs: Any) -> ClientConnection:
    """A connection to ``url``, bounded in time like :func:`client`."""
    return connect(
        url, open_timeout=RECV_TIMEOUT, close_timeout=RECV_TIMEOUT, max_size=None, **kwargs
    )


def closed(ws: ClientConnection) -> tuple[list[dict], int | None]:
    """Read until the server closes: the frames before its close, its code."""
    frames = []
    try:
        while True:
            frames.append(recv_json(ws))
    except ConnectionClosed as close:
        return frames, (close.rcvd.code if close.rcvd else None)


def run_twistd(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run twistd to completion (killed and reaped by ``run`` on timeout)."""
    return subprocess.run(
        [str(TWISTD), *args],
        cwd=cwd,
        env=deployed_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=FAIL_TIMEOUT,
    )


def assert_refused(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    # Refused while reading the command line: no reactor was ever started.
    assert "starting up" not in output, output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"
