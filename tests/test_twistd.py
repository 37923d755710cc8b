"""``twistd redmessenger`` as deployed: the installed command and plugin, run
as a subprocess from a fresh directory (not the repository) with no
PYTHONPATH, so that what runs is what ``pip install`` put in the venv
(:mod:`deployed` runs it).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.sync.client import connect

from deployed import (
    FAIL_TIMEOUT,
    GIVE_UP_TIMEOUT,
    RECV_TIMEOUT,
    START_TIMEOUT,
    TwistdProcess,
    append_only_files,
    assert_refused,
    children,
    client,
    closed,
    deployed_env,
    hello,
    recv_json,
    run_twistd,
    running_pid,
    server_pid,
    stop_stray,
    wait_for,
)
from network import HOST, accepting, free_ports, pick_free_port
from resp import EmbeddedRedisClient, RespClient

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
    "internal-port": None,
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
    "workers": "1",
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
    "partitions": "1",
    "max-pending-bytes": "268435456",
    "redis-replicas-ack": "0",
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
    (["--workers", "2", "--internal-port", "9090"], ["--internal-port", "--workers"]),
], ids=["redis-scheme", "redis-port", "redis-db", "auth", "queue-max", "drain-chunk",
        "internal-port-workers"])
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


def test_an_internal_port_serves_health_and_metrics_off_the_public_port(
        tmp_path: Path, redis) -> None:
    public, internal = free_ports(2)
    args = ["-n", "--pidfile=", "redmessenger", "--port", f"tcp:{public}:interface={HOST}",
            "--internal-port", f"tcp:{internal}:interface={HOST}", "--redis", redis.url,
            "--auth", "off"]
    with TwistdProcess(args, tmp_path, tmp_path / "twistd.log") as twistd:
        twistd.wait_accepting(public)
        twistd.wait_accepting(internal)

        def status(port: int, path: str) -> int:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as answer:
                    return answer.status
            except urllib.error.HTTPError as error:
                return error.code

        wait_for(lambda: status(internal, "/health") == 200, "/health to say ok",
                 START_TIMEOUT, twistd.alive)
        assert [status(public, path) for path in ("/", "/health", "/metrics", "/client.js")] \
            == [404, 404, 404, 200]
        assert status(internal, "/metrics") == 200
        twistd.stop()
        twistd.assert_stopped_cleanly()
