"""Fixtures shared by the whole suite.

Redis: every test that needs one gets a real redis-server, found and started
exactly as the embedded service does it (:mod:`redmessenger.redisserver`),
on a free port of 127.0.0.1 (never 6379, which may be someone else's) with
its files in a temporary directory.

- ``redis``: the session's shared server, flushed before each test.
- ``private_redis``: a server of the test's own, for tests that stop, kill
  or restart Redis.
- ``redis_factory``: starts more servers of the test's own, set up as asked.
- ``resp_client``: makes a :class:`RespClient` for any port, to look at a
  Redis that a test started some other way.

Fixtures run outside the reactor, so they use plain blocking sockets and
subprocesses, each wait bounded by a deadline.

Keep this module free of module-level imports of redmessenger (and of
anything that imports ``twisted.internet.reactor``, such as txredisapi):
pytest imports it *before* pytest-twisted installs the reactor named by
``--reactor`` (setup.cfg: asyncio), so such an import would install the
default reactor first and pytest would stop with an INTERNALERROR.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from redmessenger.settings import RedisAddress

HOST = "127.0.0.1"
#: Seconds a redis-server gets to answer PING after it is spawned.
START_TIMEOUT = 10.0
#: Seconds a redis-server gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: How often readiness is polled.
POLL_INTERVAL = 0.02


# --------------------------------------------------------------------------
# RESP: just enough of the Redis protocol for tests to make assertions with
# (LRANGE, LLEN, RPUSH, ...). Not a Redis client for anything else.
# --------------------------------------------------------------------------


class RedisReplyError(Exception):
    """Redis answered with an error (``-ERR ...``)."""


def encode_command(*args: bytes | str | int | float) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, int | float):
            data = repr(arg).encode()
        else:
            raise TypeError(f"cannot send {arg!r} to Redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def read_reply(stream: IO[bytes]) -> Any:
    """Read one RESP2 reply: ``str`` for a status, ``int``, ``bytes`` or
    ``None`` for a bulk string, ``list`` (possibly nested) for an array, and
    a :class:`RedisReplyError` instance for an error (returned, not raised,
    so an error inside an array, as from EXEC, stays in its place)."""
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError(f"connection closed in a reply (got {line!r})")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RedisReplyError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = stream.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("connection closed in a bulk string")
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        if count < 0:
            return None
        return [read_reply(stream) for _ in range(count)]
    raise ValueError(f"not a RESP reply: {line!r}")


def _decoded(reply: Any) -> Any:
    if isinstance(reply, bytes):
        return reply.decode()
    if isinstance(reply, list):
        return [_decoded(item) for item in reply]
    return reply


class RespClient:
    """Sends one command per connection and returns its reply, so it needs
    no closing and never carries a half-read reply across a Redis restart."""

    def __init__(self, port: int, host: str = HOST, timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout

    def command(self, *args: bytes | str | int | float, decode: bool = False) -> Any:
        """Run one command; raise :class:`RedisReplyError` if Redis answers
        with an error. ``decode=True`` turns bulk strings into ``str``."""
        with socket.create_connection((self.host, self.port), timeout=self.timeout) as sock:
            sock.sendall(encode_command(*args))
            with sock.makefile("rb") as stream:
                reply = read_reply(stream)
        if isinstance(reply, RedisReplyError):
            raise reply
        return _decoded(reply) if decode else reply

    def pipeline(self, commands: list[tuple]) -> list[Any]:
        """Send many commands at once and read all their replies (errors
        are returned in place, not raised)."""
        with socket.create_connection((self.host, self.port), timeout=self.timeout) as sock:
            sock.sendall(b"".join(encode_command(*args) for args in commands))
            with sock.makefile("rb") as stream:
                return [read_reply(stream) for _ in commands]


# --------------------------------------------------------------------------
# redis-server processes
# --------------------------------------------------------------------------


def pick_free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago (the kernel's pick for
    port 0). Whoever uses it must cope with losing a race for it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


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
        args = [*server_arguments(port, self.data_dir, bind=HOST, appendonly=self.appendonly),
                *self.extra_args]
        self._process = subprocess.Popen(
            [self.executable, *args], stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT)
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
                    f"{port}:\n{self.log_tail()}")
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
            f"({why}):\n{self.log_tail()}")


@contextlib.contextmanager
def spawned_redis(argv: list[str], ping: Callable[[], Any]) -> Iterator[subprocess.Popen]:
    """A redis-server started with ``argv`` (for set-ups the fixtures above
    do not make: a Unix socket, TLS), ready once ``ping()`` answers PONG,
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


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("soak", "the soak test (tests/test_soak.py), larger by hand")
    group.addoption("--soak-clients", type=int, default=1000, help="concurrent clients")
    group.addoption("--soak-seconds", type=float, default=40.0,
                    help="how long clients churn and messages flow")
    group.addoption("--soak-rate", type=float, default=150.0, help="messages sent per second")
    group.addoption("--soak-seed", type=int, default=1, help="random seed")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerProcess]:
    """The session's shared redis-server. Tests want ``redis`` instead,
    which hands it over running and empty."""
    server = RedisServerProcess(tmp_path_factory.mktemp("redis"), appendonly=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis(redis_server: RedisServerProcess) -> RedisServerProcess:
    """The shared redis-server, running (even if an earlier test stopped
    it) and flushed."""
    if not redis_server.running:
        redis_server.start()
    redis_server.flushall()
    return redis_server


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., RedisServerProcess]]:
    """Starts redis-servers of this test's own:
    ``redis_factory(data_dir, appendonly=False)``; all are stopped after
    the test."""
    servers: list[RedisServerProcess] = []

    def start(data_dir: Path, *, appendonly: bool = False) -> RedisServerProcess:
        server = RedisServerProcess(data_dir, appendonly=appendonly)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def private_redis(tmp_path: Path,
                  redis_factory: Callable[..., RedisServerProcess]) -> RedisServerProcess:
    """A redis-server of this test's own, with an append-only file so that
    what it holds survives ``stop()`` and ``start()``."""
    return redis_factory(tmp_path / "private-redis", appendonly=True)


@pytest.fixture
def resp_client() -> Callable[[int], RespClient]:
    """Makes a :class:`RespClient` for a Redis on a given port."""
    return RespClient


@pytest.fixture
def messenger(redis: RedisServerProcess) -> Iterator[Callable[..., Any]]:
    """Starts RedMessengerServices in the test's reactor against ``redis``:
    ``rm = await messenger(**settings)`` (see tests/harness.py); all are
    stopped after the test."""
    from harness import run, start_service

    started = []

    async def start(**settings):
        service = await start_service(redis, **settings)
        started.append(service)
        return service

    try:
        yield start
    finally:
        for service in started:
            run(service.stop())


def make_certificate(directory: Path, name: str = "cert",
                     common_name: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, as PEM files (key, cert);
    the certificate is its own CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / f"{name}-key.pem", directory / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every twisted.logger event emitted during the test, as text."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event):
        text = formatEvent(event)
        if event.get("log_failure") is not None:
            text += " | " + event["log_failure"].getErrorMessage()
        lines.append(text)

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (key, cert) PEM files."""
    return make_certificate(tmp_path)


@pytest.fixture
def free_port() -> int:
    """A port of 127.0.0.1 that was free when the test started."""
    return pick_free_port()
