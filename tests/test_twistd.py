"""``twistd redmessenger`` as deployed: the installed command and plugin, run
as a subprocess from a fresh directory (not the repository) with no
PYTHONPATH, so that what runs is what ``pip install`` put in the venv.

The helpers here (:class:`TwistdProcess` and friends) are shared with
``test_embedding.py``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from conftest import HOST, RedisReplyError, RespClient, pick_free_port

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
#: The log line subscriber.py writes once its PSUBSCRIBE is confirmed.
SUBSCRIBED = "Subscribed to ['rm.users.*', 'rm.groups.*']"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def deployed_env(**extra: str) -> dict[str, str]:
    """The test's environment without PYTHONPATH, so the repository (or
    whatever a developer pointed it at) cannot shadow the installed package."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env.update(extra)
    return env


def wait_for(check: Callable[[], Any], what: str, timeout: float = RECV_TIMEOUT,
             alive: Callable[[], None] | None = None) -> Any:
    """Poll ``check`` until it returns something true; fail after ``timeout``
    (or as soon as ``alive`` raises, for a process that died meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL_INTERVAL)


def accepting(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


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


class EmbeddedRedisClient(RespClient):
    """A :class:`RespClient` for an embedded redis-server, which requires
    the password kept in its data directory: read at every command, since
    the server makes it at its first start."""

    def __init__(self, port: int, data_dir: Path) -> None:
        super().__init__(port)
        self.data_dir = data_dir

    def pipeline(self, commands: list[tuple]) -> list[Any]:
        password = (self.data_dir / "redis-password").read_text().strip()
        authorized, *replies = super().pipeline([("AUTH", password), *commands])
        if isinstance(authorized, RedisReplyError):
            raise authorized
        return replies

    def command(self, *args: bytes | str | int | float, decode: bool = False) -> Any:
        [reply] = self.pipeline([args])
        if isinstance(reply, RedisReplyError):
            raise reply
        return decoded(reply) if decode else reply


def decoded(reply: Any) -> Any:
    if isinstance(reply, bytes):
        return reply.decode()
    if isinstance(reply, list):
        return [decoded(item) for item in reply]
    return reply


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

    def __init__(self, args: list[str], cwd: Path, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self._terminated = False
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(TWISTD), *args], cwd=cwd, env=env or deployed_env(),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

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
            raise AssertionError(f"twistd {' '.join(self.args)} exited with code "
                                 f"{self.process.returncode}:\n{self.log()}")

    def wait_accepting(self, port: int) -> None:
        wait_for(lambda: accepting(port), f"twistd to accept on port {port}",
                 START_TIMEOUT, self.alive)

    def wait_subscribed(self, redis: RespClient | None = None) -> None:
        """Until its PSUBSCRIBE is confirmed (a PUBLISH before that is lost):
        on a Redis of its own, until Redis counts the two patterns; on a
        shared one, whose count other subscribers may change, until twistd
        logs it."""
        if redis is not None:
            wait_for(lambda: numpat(redis) == 2, "RedMessenger to PSUBSCRIBE",
                     START_TIMEOUT, self.alive)
        else:
            wait_for(lambda: SUBSCRIBED in self.log(), "RedMessenger to PSUBSCRIBE",
                     START_TIMEOUT, self.alive)

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
            raise AssertionError(f"twistd did not exit within {STOP_TIMEOUT:g} s of "
                                 f"SIGTERM:\n{self.log()}") from None

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
    with connect(f"ws://{HOST}:{port}/", open_timeout=RECV_TIMEOUT,
                 close_timeout=RECV_TIMEOUT, max_size=None) as ws:
        yield ws


def closed(ws: ClientConnection) -> tuple[list[dict], int | None]:
    """Read until the server closes: the frames before its close, its code."""
    frames = []
    try:
        while True:
            frames.append(recv_json(ws))
    except ConnectionClosed as close:
        return frames, (close.rcvd.code if close.rcvd else None)


def free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(pick_free_port())
    return list(ports)


def run_twistd(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run twistd to completion (killed and reaped by ``run`` on timeout)."""
    return subprocess.run([str(TWISTD), *args], cwd=cwd, env=deployed_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=FAIL_TIMEOUT)


# --------------------------------------------------------------------------
# The embedded default
# --------------------------------------------------------------------------


def test_embedded_default_delivers_stores_and_keeps_messages_across_a_restart(
        tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    workdir.mkdir()
    port, embedded_port = free_ports(2)
    args = ["-n", "redmessenger", "--port", f"tcp:{port}:interface={HOST}",
            "--embedded-port", str(embedded_port), "--auth", "off"]
    redis = EmbeddedRedisClient(embedded_port, workdir / "redmessenger-data")
    queue = "rm:users:user1:messages"
    servers: list[int] = []
    try:
        with TwistdProcess(args, workdir, tmp_path / "first.log") as twistd:
            twistd.wait_accepting(port)
            twistd.wait_subscribed(redis)
            servers.append(server_pid(redis))
            kids = children(twistd.pid)
            assert kids is None or servers[0] in kids, "redis-server is not twistd's child"

            # Offline: stored in Redis, then drained on connect.
            assert redis.command("PUBLISH", "rm.users.user1", "while you were away") == 1
            wait_for(lambda: redis.command("LLEN", queue) == 1, "the message to be stored")
            stored = json.loads(redis.command("LINDEX", queue, 0))
            assert stored["payload"] == "while you were away"
            assert stored["source"] == "rm.users.user1"
            with client(port) as ws:
                assert hello(ws, {"id": "user1"}) == {
                    "type": "welcome", "id": "user1", "channel": "rm.users.user1",
                    "queued": 1, "ack": False}
                drained = recv_json(ws)
                assert drained["type"] == "message"
                assert drained["payload"] == "while you were away"
                assert drained["queued"] is True
                assert drained["id"] == stored["id"]
                assert drained["timestamp"] == stored["timestamp"]
                assert redis.command("EXISTS", queue) == 0

                # Online: delivered live.
                assert redis.command("PUBLISH", "rm.users.user1", "Hello, world!") == 1
                live = recv_json(ws)
                assert live["type"] == "message"
                assert live["payload"] == "Hello, world!"
                assert live["source"] == "rm.users.user1"
                assert live["queued"] is False
                assert live["bubble"] is True
                assert "tag" not in live

            # Offline again, just before the stop.
            assert redis.command("PUBLISH", "rm.users.user1", "kept across a restart") == 1
            wait_for(lambda: redis.command("LLEN", queue) == 1, "the message to be stored")
            twistd.stop()
            twistd.assert_stopped_cleanly()

        assert not accepting(embedded_port), "the embedded redis-server still listens"
        wait_for(lambda: not running_pid(servers[0]), "the embedded redis-server to exit")
        assert append_only_files(workdir / "redmessenger-data"), \
            list((workdir / "redmessenger-data").iterdir())

        # The same command in the same directory finds the message again.
        with TwistdProcess(args, workdir, tmp_path / "second.log") as twistd:
            twistd.wait_accepting(port)
            twistd.wait_subscribed(redis)
            servers.append(server_pid(redis))
            with client(port) as ws:
                assert hello(ws, "user1")["queued"] == 1
                drained = recv_json(ws)
                assert drained["payload"] == "kept across a restart"
                assert drained["queued"] is True
            twistd.stop()
            twistd.assert_stopped_cleanly()
        assert not accepting(embedded_port)
        wait_for(lambda: not running_pid(servers[1]), "the embedded redis-server to exit")
    finally:
        for pid in servers:
            stop_stray(pid)


def test_sigterm_says_goodbye_to_connected_clients_and_stops_redis(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    workdir.mkdir()
    port, embedded_port = free_ports(2)
    args = ["-n", "redmessenger", "--port", f"tcp:{port}:interface={HOST}",
            "--embedded-port", str(embedded_port), "--auth", "off"]
    redis = EmbeddedRedisClient(embedded_port, workdir / "redmessenger-data")
    servers: list[int] = []
    try:
        with TwistdProcess(args, workdir, tmp_path / "twistd.log") as twistd:
            twistd.wait_accepting(port)
            twistd.wait_subscribed(redis)
            servers.append(server_pid(redis))
            with client(port) as ws:
                hello(ws, {"id": "user1", "ack": True})
                assert redis.command("PUBLISH", "rm.users.user1", "never acked") == 1
                assert recv_json(ws)["tag"] == 1
                twistd.terminate()
                frames, code = closed(ws)
            assert frames == [{"type": "error", "code": "shutting_down",
                               "reason": "the server is shutting down"}]
            assert code == 1001
            twistd.stop()
            twistd.assert_stopped_cleanly()
        assert not accepting(embedded_port), "the embedded redis-server still listens"
        # The unacknowledged message went back to Redis before it stopped.
        with TwistdProcess(args, workdir, tmp_path / "again.log") as twistd:
            twistd.wait_accepting(port)
            servers.append(server_pid(redis))
            with client(port) as ws:
                assert hello(ws, "user1")["queued"] == 1
                assert recv_json(ws)["payload"] == "never acked"
            twistd.stop()
            twistd.assert_stopped_cleanly()
    finally:
        for pid in servers:
            stop_stray(pid)


# --------------------------------------------------------------------------
# An existing Redis
# --------------------------------------------------------------------------


def test_existing_redis_is_used_and_no_redis_server_is_started(tmp_path: Path, redis) -> None:
    workdir = tmp_path / "run"
    workdir.mkdir()
    port = pick_free_port()
    fixture = RespClient(redis.port)
    fixture.command("SET", "rm:users:user1:key", "s3cret")
    # The default --auth (required): the hello's key is checked against Redis.
    args = ["-n", "redmessenger", "--port", f"tcp:{port}:interface={HOST}",
            "--redis", redis.url]
    with TwistdProcess(args, workdir, tmp_path / "twistd.log") as twistd:
        twistd.wait_accepting(port)
        twistd.wait_subscribed()
        assert not (workdir / "redmessenger-data").exists()
        assert children(twistd.pid) in (None, set()), "twistd started a child process"

        with client(port) as ws:
            ws.send(json.dumps({"id": "user1", "key": "wrong"}))
            frames, code = closed(ws)
            assert [f["code"] for f in frames] == ["unauthorized"]
            assert code == 4001

        with client(port) as ws:
            assert hello(ws, {"id": "user1", "key": "s3cret"})["queued"] == 0
            assert fixture.command("PUBLISH", "rm.users.user1", b"\xff binary") >= 1
            frame = recv_json(ws)
            assert base64.b64decode(frame["payload_base64"]) == b"\xff binary"
            assert "payload" not in frame

        # A user who is not connected gets it stored in that same Redis.
        assert fixture.command("PUBLISH", "rm.users.user2", "later") >= 1
        wait_for(lambda: fixture.command("LLEN", "rm:users:user2:messages"),
                 "the message to be stored")
        stored = json.loads(fixture.command("LINDEX", "rm:users:user2:messages", 0))
        assert stored["payload"] == "later"
        twistd.stop()
        twistd.assert_stopped_cleanly()
    assert fixture.command("PING") == "PONG", "RedMessenger stopped a Redis it did not start"
    assert not (workdir / "redmessenger-data").exists()


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------

#: Every option and the default its help shows (None: no default shown).
OPTIONS = {
    "port": "8080",
    "redis": None,
    "embedded-port": "6379",
    "data-dir": "redmessenger-data",
    "prefix": "rm",
    "auth": "required",
    "queue-ttl": "0",
    "queue-max": "0",
    "hello-timeout": "10",
    "handshake-timeout": "10",
    "max-sockets-per-user": "8",
    "max-frame": "65536",
    "drain-chunk": "500",
    "shutdown-timeout": "10",
    "verbose": None,
    "allowed-origins": "*",
    "log-format": "text",
    "jwt-secret": None,
    "jwt-audience": None,
    "jwt-issuer": None,
    "jwt-max-age": "0",
    "max-connections": "0",
    "max-connections-per-address": "0",
    "hello-rate": "0",
    "ping-interval": "30",
    "ping-timeout": "10",
    "max-socket-buffer": "1048576",
    "ack-window": "1000",
    "inbox": None,
    "inbox-claim-after": "30",
    "max-pending-bytes": "268435456",
    "dead-max": "100000",
}


def test_the_documented_options_are_all_the_options() -> None:
    from redmessenger.tap import Options

    names = {o[0] for o in Options.optParameters + Options.optFlags}
    assert names == set(OPTIONS)


def option_blocks(help_text: str) -> dict[str, str]:
    """Each option's help, its wrapped lines joined (words wrapped at a
    hyphen are joined again)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in help_text.splitlines():
        match = re.match(r"^\s+(?:-\w, )?--([\w-]+)", line)
        if match:
            current = blocks.setdefault(match.group(1), [])
        elif not line.strip() or not line.startswith(" "):
            current = None
        if current is not None:
            current.append(line.strip())
    return {name: re.sub(r"-\n", "-", "\n".join(lines)).replace("\n", " ")
            for name, lines in blocks.items()}


def test_help_lists_every_option_with_its_default(tmp_path: Path) -> None:
    result = run_twistd(["redmessenger", "--help"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    blocks = option_blocks(result.stdout)
    for name, default in OPTIONS.items():
        assert name in blocks, f"--{name} missing from:\n{result.stdout}"
        if default is not None:
            assert f"[default: {default}]" in blocks[name], blocks[name]
    assert "embedded" in blocks["redis"]
    assert blocks["verbose"].startswith("-v, --verbose")


def test_readme_documents_every_option_with_its_default() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.rst").read_text()
    for name, default in OPTIONS.items():
        shown = re.escape(f"``{default}``") if default is not None else r"(none|off)"
        assert re.search(rf"^   \* - ``--{name}``.*\n     - {shown}\n", readme, re.MULTILINE), \
            f"README.rst's option table lacks --{name} with its default {default}"


def test_the_plugin_is_found_in_the_installed_package(tmp_path: Path) -> None:
    code = """if True:
        import json, sys
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        maker = makers["redmessenger"]
        import redmessenger.tap
        print(json.dumps({
            "module": maker.module,
            "options": maker.options is redmessenger.tap.Options,
            "file": redmessenger.tap.__file__,
            "reactor": "twisted.internet.reactor" in sys.modules,
        }))
    """
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=deployed_env(),
                            capture_output=True, text=True, timeout=FAIL_TIMEOUT)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["module"] == "redmessenger.tap", found
    assert found["options"], found
    # Listing plugins and reading the options must leave the choice of
    # reactor to twistd --reactor.
    assert not found["reactor"], found

    listing = run_twistd(["--help"], tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert re.search(r"^\s+redmessenger\s", listing.stdout, re.MULTILINE), listing.stdout


# --------------------------------------------------------------------------
# Startup failures: at once, not zero, saying what to do
# --------------------------------------------------------------------------


def assert_refused(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    # Refused while reading the command line: no reactor was ever started.
    assert "starting up" not in output, output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"


def test_taken_embedded_port_is_refused_at_once(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_twistd(["-n", "redmessenger", "--port", f"tcp:0:interface={HOST}",
                             "--embedded-port", str(port)], tmp_path)
    assert_refused(result, str(port), "--embedded-port", "--redis")
    assert not (tmp_path / "redmessenger-data").exists()


@pytest.mark.parametrize(("args", "needles"), [
    (["--redis", "http://127.0.0.1/0"], ["--redis", "redis://"]),
    (["--redis", "redis://127.0.0.1:port/0"], ["--redis", "port is not a number"]),
    (["--redis", "redis://127.0.0.1:1/zero"], ["--redis", "database"]),
    (["--auth", "maybe"], ["--auth must be required, optional, jwt or off"]),
    (["--queue-max", "-1"], ["--queue-max must be at least 0"]),
    (["--drain-chunk", "lots"], ["--drain-chunk must be a number"]),
], ids=["redis-scheme", "redis-port", "redis-db", "auth", "queue-max", "drain-chunk"])
def test_bad_options_are_refused_at_once(tmp_path: Path, args: list[str],
                                         needles: list[str]) -> None:
    port = pick_free_port()
    result = run_twistd(["-n", "redmessenger", "--port", f"tcp:0:interface={HOST}",
                         "--embedded-port", str(port), *args], tmp_path)
    assert_refused(result, *needles)
    assert not (tmp_path / "redmessenger-data").exists()


@pytest.mark.parametrize("embedded", [False, True], ids=["redis", "embedded"])
def test_taken_websocket_port_stops_twistd_with_an_error(tmp_path: Path, redis,
                                                         embedded: bool) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        where = (["--embedded-port", str(pick_free_port())] if embedded
                 else ["--redis", redis.url])
        args = ["-n", "redmessenger", "--port", f"tcp:{port}:interface={HOST}", *where]
        with TwistdProcess(args, tmp_path, tmp_path / "twistd.log") as twistd:
            try:
                code = twistd.process.wait(timeout=GIVE_UP_TIMEOUT)
            except subprocess.TimeoutExpired:
                twistd.stop()
                raise AssertionError("twistd kept running without its WebSocket port") \
                    from None
            assert code not in (0, None), twistd.log()
            assert str(port) in twistd.log()


@pytest.mark.parametrize("embedded", [False, True], ids=["redis", "embedded"])
def test_a_port_that_fails_only_when_listening_still_exits_non_zero(tmp_path: Path, redis,
                                                                    embedded: bool) -> None:
    """Endpoint kinds not checked up front (here a Unix socket in a missing
    directory) fail at start: the process must still exit non-zero, and stop
    the embedded Redis it started."""
    redis_port = pick_free_port()
    where = (["--embedded-port", str(redis_port)] if embedded else ["--redis", redis.url])
    args = ["-n", "redmessenger", "--port", f"unix:{tmp_path}/missing/sock", *where]
    with TwistdProcess(args, tmp_path, tmp_path / "twistd.log") as twistd:
        try:
            code = twistd.process.wait(timeout=GIVE_UP_TIMEOUT)
        except subprocess.TimeoutExpired:
            twistd.stop()
            raise AssertionError("twistd kept running without its WebSocket port") from None
        assert code == 1, twistd.log()
        assert "could not start" in twistd.log()
    assert not accepting(redis_port)


def test_options_from_the_environment_and_json_logs(tmp_path: Path, redis) -> None:
    """Every option can come from REDMESSENGER_*; the command line wins; and
    --log-format json writes one JSON object per line with the event's
    structured fields."""
    port = pick_free_port()
    env = deployed_env(REDMESSENGER_REDIS=redis.url, REDMESSENGER_PORT="1",
                       REDMESSENGER_AUTH="off", REDMESSENGER_LOG_FORMAT="json",
                       REDMESSENGER_PREFIX="envprefix")
    args = ["-n", "redmessenger", "--port", f"tcp:{port}:interface={HOST}"]
    with TwistdProcess(args, tmp_path, tmp_path / "twistd.log", env=env) as twistd:
        twistd.wait_accepting(port)
        wait_for(lambda: "Subscribed to" in twistd.log(), "the subscription", START_TIMEOUT,
                 twistd.alive)
        with connect(f"ws://{HOST}:{port}/") as client:
            client.send('{"id": "user1"}')
            welcome = json.loads(client.recv(timeout=RECV_TIMEOUT))
            assert welcome["channel"] == "envprefix.users.user1"  # the env's prefix
        wait_for(lambda: "Connection" in twistd.log(), "the close to be logged",
                 START_TIMEOUT, twistd.alive)
        twistd.terminate()
        twistd.process.wait(timeout=GIVE_UP_TIMEOUT)
    records = [json.loads(line) for line in twistd.log().splitlines() if line.strip()]
    assigned = [r for r in records if r["message"].startswith("Assigning id user1")]
    assert assigned and assigned[0]["uid"] == "user1" and assigned[0]["level"] == "info"
    assert assigned[0]["namespace"] == "redmessenger.delivery"
    assert all({"time", "level", "namespace", "message"} <= set(r) for r in records)
