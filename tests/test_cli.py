"""The ``redmessenger`` command. It runs the global reactor, which the test
run already runs, so it is run as a subprocess (``python -m
redmessenger.cli``) against the ``redis`` fixture; only what stops before
the reactor (``--help``, usage errors) is called in-process."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from redmessenger import __version__
from redmessenger.cli import ClusterStatus, NodeStatus, health_url, main, status_table

from commandline import CLI_TIMEOUT, cli, cli_async, ok, queue
from harness import aiotest, eventually, start_service

# -- in-process: arguments only -------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--help"], ["send", "--help"], ["queue", "--help"], ["group", "--help"],
    ["group", "add", "--help"], ["group", "remove", "--help"], ["group", "list", "--help"],
    ["token", "--help"], ["token", "set", "--help"], ["token", "show", "--help"],
    ["status", "--help"], ["listen", "--help"],
    ["dead", "--help"], ["dead", "list", "--help"], ["dead", "retry", "--help"],
    ["dead", "drop", "--help"],
])
def test_every_command_has_help(argv, capsys):
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("usage: redmessenger")


@pytest.mark.parametrize(("argv", "says"), [
    ([], "required: COMMAND"),
    (["send", "hello"], "one of the arguments --user/-u --group/-g is required"),
    (["send", "--user", "a", "--group", "g", "hello"], "not allowed with"),
    (["send", "--user", "has space", "hello"], "no spaces"),
    (["send", "--group", "", "hello"], "'': a group id is 1 to 256 printable characters"),
    (["send", "--group", "two words", "hello"], "a group id is 1 to 256"),
    (["send", "--group", "x" * 257, "hello"], "a group id is 1 to 256"),
    (["queue", "user1", "--count", "-1"], "negative"),
    (["group", "add", "cats"], "required: UID"),
    (["token"], "required: ACTION"),
    (["--redis", "http://nope", "queue", "user1"], "--redis: 'http://nope': expected"),
    (["--redis", "redis://host:port", "queue", "user1"], "the port is not a number"),
    (["--prefix", "", "queue", "user1"], "--prefix must not be empty"),
    (["status", "--url", "ftp://host"], "expected http://host:port"),
    (["listen", "--url", "http://host/", "--id", "u"], "expected ws://host:port/"),
    (["listen", "--url", "ws://host/"], "required: --id"),
    (["listen", "--url", "ws://host/", "--id", "u", "--key", "k", "--key-file", "f"],
     "not allowed with"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2_and_say_why(argv, says, capsys):
    assert main(argv) == 2
    assert says in capsys.readouterr().err


def test_the_health_url_is_derived_from_the_base_url():
    assert health_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080/health"
    assert health_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080/health"
    assert health_url("https://host/rm/") == "https://host/rm/health"
    assert health_url("http://host:1/health") == "http://host:1/health"


def test_the_console_script_is_installed(redis):
    script = Path(sys.executable).with_name("redmessenger")
    assert script.exists(), "reinstall the package: setup.cfg declares the console script"
    result = subprocess.run([script, "--version"], capture_output=True, text=True,
                            timeout=CLI_TIMEOUT)
    assert result.returncode == 0 and result.stdout.startswith("redmessenger ")


# -- send, with nobody listening --------------------------------------------------


def test_send_with_nobody_listening_stores_the_envelope_redmessenger_would(redis, tmp_path):
    out = ok(cli(redis.url, "send", "--user", "user1", "Hello, world!", cwd=tmp_path))
    assert "stored for 1 user, to be delivered when they connect" in out
    [stored] = queue(redis, "user1")
    assert set(stored) == {"id", "source", "timestamp", "payload"}
    assert stored["source"] == "rm.users.user1" and stored["payload"] == "Hello, world!"
    assert stored["id"] in out

    blob = bytes(range(256))
    ok(cli(redis.url, "send", "-u", "user1", "-", stdin=blob))
    first, second = queue(redis, "user1")
    assert first == stored
    assert base64.b64decode(second["payload_base64"]) == blob
    assert second["id"] != first["id"] and second["timestamp"] >= first["timestamp"]


def test_send_to_a_group_stores_once_for_each_member(redis):
    redis.command("RPUSH", "rm:groups:cats:members", "user1", "user2", "user1")
    out = ok(cli(redis.url, "send", "--group", "cats", "Meow!"))
    assert "for 2 users" in out
    [one], [two] = queue(redis, "user1"), queue(redis, "user2")
    assert one == two and one["source"] == "rm.groups.cats" and one["payload"] == "Meow!"

    out = ok(cli(redis.url, "send", "--group", "nobody-here", "Hello?"))
    assert "reached nobody" in out
    redis.command("SET", "rm:groups:bad:members", "oops")
    result = cli(redis.url, "send", "--group", "bad", "x")
    assert result.returncode == 1
    assert "rm:groups:bad:members is a string, not a list or a set" in result.stderr


def test_send_to_a_group_with_a_member_redis_refuses_stores_for_nobody(redis):
    """All or nothing: a retry must not give the first members a second copy."""
    redis.command("RPUSH", "rm:groups:cats:members", "a", "b", "c", "d")
    redis.command("SET", "rm:users:c:messages", "not a list")
    result = cli(redis.url, "send", "--group", "cats", "Meow!")
    assert result.returncode == 1, result
    assert "rm:users:c:messages is a string, not a list" in result.stderr
    assert "Traceback" not in result.stderr
    assert [queue(redis, uid) for uid in "abd"] == [[], [], []]


def test_send_honours_the_prefix_and_the_queue_limits(redis):
    for i in range(3):
        ok(cli(redis.url, "send", "-u", "user1", "--queue-max", "2", "--queue-ttl", "600",
               str(i), REDMESSENGER_PREFIX="app"))
    assert [e["payload"] for e in queue(redis, "user1", prefix="app")] == ["1", "2"]
    assert [e["source"] for e in queue(redis, "user1", prefix="app")] == ["app.users.user1"] * 2
    assert 0 < redis.command("TTL", "app:users:user1:messages") <= 600
    assert queue(redis, "user1") == []


# -- queue, group, token ------------------------------------------------------------


def test_queue_shows_the_length_and_the_oldest_messages_decoded(redis):
    ok(cli(redis.url, "send", "-u", "user1", "first"))
    ok(cli(redis.url, "send", "-u", "user1", "-", stdin=b"\xff\xfe"))
    redis.command("RPUSH", "rm:users:user1:messages", "pushed by hand")

    out = ok(cli(redis.url, "queue", "user1", "--count", "2"))
    lines = out.splitlines()
    assert lines[0] == "rm:users:user1:messages: 3 messages; the oldest 2:"
    assert lines[1].endswith('rm.users.user1  "first"')
    assert lines[2].endswith("rm.users.user1  base64:" + base64.b64encode(b"\xff\xfe").decode())
    assert len(lines) == 3

    docs = [json.loads(line) for line in ok(cli(redis.url, "queue", "user1", "--json"))
            .splitlines()]
    assert [d["raw"] for d in docs] == [False, False, True]
    first = json.loads(redis.command("LINDEX", "rm:users:user1:messages", 0))
    assert docs[0] == {**first, "raw": False}
    assert docs[2] == {"source": "rm.users.user1", "payload": "pushed by hand", "raw": True}

    assert ok(cli(redis.url, "queue", "nobody")) == "rm:users:nobody:messages: 0 messages\n"


def test_group_members_are_added_removed_and_listed_in_either_type(redis):
    out = ok(cli(redis.url, "group", "add", "cats", "user1", "user2", "user2"))
    assert "Added 2 members" in out and "a set" in out
    assert redis.command("TYPE", "rm:groups:cats:members") == "set"
    assert ok(cli(redis.url, "group", "list", "cats")).split() == ["user1", "user2"]
    ok(cli(redis.url, "group", "remove", "cats", "user1", "stranger"))
    assert redis.command("SMEMBERS", "rm:groups:cats:members", decode=True) == ["user2"]

    # A list stays a list, in its order, and gets nobody twice.
    redis.command("RPUSH", "rm:groups:dogs:members", "b", "a", "b")
    out = ok(cli(redis.url, "group", "add", "dogs", "a", "c"))
    assert "Added 1 member" in out and "a list" in out
    assert redis.command("LRANGE", "rm:groups:dogs:members", 0, -1, decode=True) == [
        "b", "a", "b", "c"]
    assert ok(cli(redis.url, "group", "list", "dogs")).split() == ["b", "a", "c"]
    ok(cli(redis.url, "group", "remove", "dogs", "b"))
    assert redis.command("LRANGE", "rm:groups:dogs:members", 0, -1, decode=True) == ["a", "c"]

    result = cli(redis.url, "group", "list", "empty")
    assert result.returncode == 0 and result.stdout == "" and "no members" in result.stderr
    redis.command("HSET", "rm:groups:odd:members", "a", "1")
    result = cli(redis.url, "group", "add", "odd", "a")
    assert result.returncode == 1 and "is a hash, not a list or a set" in result.stderr


def test_token_set_makes_a_strong_key_and_show_prints_it(redis):
    token = ok(cli(redis.url, "token", "set", "user1")).strip()
    assert len(token) >= 43 and redis.command("GET", "rm:users:user1:key", decode=True) == token
    assert ok(cli(redis.url, "token", "show", "user1")) == token + "\n"

    result = cli(redis.url, "token", "set", "user1", "-", stdin=b"s3cret\n")
    assert result.returncode == 0 and result.stdout == ""  # a given key is not echoed
    assert redis.command("GET", "rm:users:user1:key") == b"s3cret"
    ok(cli(redis.url, "token", "set", "user2", "chosen"))
    assert redis.command("GET", "rm:users:user2:key") == b"chosen"

    result = cli(redis.url, "token", "show", "nobody")
    assert result.returncode == 1 and "user nobody has no key" in result.stderr


def test_an_unreachable_redis_exits_1_naming_the_url(redis, free_port):
    url = f"redis://127.0.0.1:{free_port}/0"
    result = cli(url, "queue", "user1")
    assert result.returncode == 1
    assert f"cannot reach Redis at redis://127.0.0.1:{free_port}/0" in result.stderr
    result = cli(redis.url.replace("/0", "/999"), "queue", "user1")
    assert result.returncode == 1 and "refused the connection" in result.stderr


# -- with a RedMessenger --------------------------------------------------------------


@aiotest
async def test_send_to_an_online_user_is_delivered_at_once(messenger):
    """Stored, and the node holding the user woken: it drains it at once."""
    rm = await messenger()
    user1 = await rm.user("user1")
    rm.redis.command("SADD", "rm:groups:cats:members", "user1")

    out = ok(await cli_async(rm.redis.url, "send", "--user", "user1", "Hello, live!"))
    assert "stored for 1 user, and the RedMessenger nodes of those connected woken" in out
    ok(await cli_async(rm.redis.url, "send", "--group", "cats", "Meow!"))
    direct, group = await user1.messages(2)
    assert (direct["payload"], direct["source"], direct["queued"]) == (
        "Hello, live!", "rm.users.user1", True)
    assert (group["payload"], group["source"]) == ("Meow!", "rm.groups.cats")
    assert rm.queue("user1") == []


@aiotest
async def test_what_send_stores_with_no_redmessenger_is_drained_when_one_starts(
        redis, messenger):
    redis.command("RPUSH", "rm:groups:cats:members", "user1", "user2")
    blob = b"\x00\xff not UTF-8"
    ok(await cli_async(redis.url, "send", "--user", "user1", "-", stdin=blob))
    ok(await cli_async(redis.url, "send", "--group", "cats", "Meow!"))
    stored = queue(redis, "user1")
    assert len(stored) == 2 and len(queue(redis, "user2")) == 1

    rm = await messenger()
    user1 = await rm.user("user1")
    assert user1.welcome["queued"] == 2
    first, second = await user1.messages(2)
    assert base64.b64decode(first["payload_base64"]) == blob
    assert (first["source"], first["queued"], first["id"]) == (
        "rm.users.user1", True, stored[0]["id"])
    assert (second["source"], second["payload"], second["id"]) == (
        "rm.groups.cats", "Meow!", stored[1]["id"])
    assert second["timestamp"] == stored[1]["timestamp"]
    assert rm.queue("user1") == [] and len(rm.queue("user2")) == 1


# -- status ----------------------------------------------------------------------------


class HealthServer:
    """A stand-in for RedMessenger's /health (its contract, not its code):
    answers what the test sets and remembers the paths it was asked for."""

    def __init__(self, scheme: str = "http") -> None:
        self.scheme = scheme
        self.code = 200
        self.body = b"{}"
        self.paths: list[bytes] = []
        self.port: Any = None

    def answer(self, code: int, doc: Any) -> None:
        self.code = code
        self.body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port.getHost().port}"


@pytest.fixture
def health_server() -> Iterator[HealthServer]:
    yield from serve_health(HealthServer())


@pytest.fixture
def tls_health_server(certificate) -> Iterator[HealthServer]:
    """The same over TLS, with the ``certificate`` fixture's (its own CA)."""
    from twisted.internet.ssl import PrivateCertificate

    key, cert = certificate
    options = PrivateCertificate.loadPEM(key.read_bytes() + cert.read_bytes()).options()
    yield from serve_health(HealthServer("https"), options)


def serve_health(server: HealthServer, tls=None) -> Iterator[HealthServer]:
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Health(Resource):
        isLeaf = True

        def render_GET(self, request):
            server.paths.append(request.path)
            if request.path != b"/health":
                request.setResponseCode(404)
                return b"not found"
            request.setResponseCode(server.code)
            request.setHeader(b"content-type", b"application/json")
            return server.body

    site = Site(Health())
    site.noisy = False
    server.port = reactor.listenTCP(0, site, interface="127.0.0.1") if tls is None else \
        reactor.listenSSL(0, site, tls, interface="127.0.0.1")
    try:
        yield server
    finally:
        pytest_twisted.blockon(server.port.stopListening())


HEALTHY = {"status": "ok", "node": "3f9c0e2a7b14",
           "redis": {"connected": True, "subscribed": True},
           "connections": 3, "users_online": 2, "version": "0.1.0"}


@aiotest
async def test_status_prints_a_healthy_report_and_exits_0(redis, health_server):
    health_server.answer(200, HEALTHY)
    out = ok(await cli_async(redis.url, "status", "--url", health_server.url + "/"))
    assert health_server.paths == [b"/health"]
    assert out.splitlines() == [
        f"{health_server.url}/health: HTTP 200 OK",
        "status:       ok",
        "node:         3f9c0e2a7b14",
        "version:      0.1.0",
        "redis:        connected, subscribed",
        "connections:  3",
        "users online: 2",
    ]
    result = await cli_async(redis.url, "status", "--url", health_server.url, "--json")
    assert result.returncode == 0 and json.loads(result.stdout) == HEALTHY


@aiotest
async def test_status_of_an_https_url_with_a_private_ca(redis, tls_health_server, certificate,
                                                        tmp_path):
    """Without ``--ca``, a certificate the system does not trust is one
    clear line (no Failure's repr); with it, the report."""
    tls_health_server.answer(200, HEALTHY)
    result = await cli_async(redis.url, "status", "--url", tls_health_server.url)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"redmessenger: {tls_health_server.url}/health: TLS: certificate verify failed (a "
        "private CA? give its certificate with --ca FILE)"], result.stderr
    out = ok(await cli_async(redis.url, "status", "--url", tls_health_server.url,
                             "--ca", str(certificate[1])))
    assert out.splitlines()[:2] == [f"{tls_health_server.url}/health: HTTP 200 OK",
                                    "status:       ok"]
    missing, key = tmp_path / "missing.pem", certificate[0]
    for ca, said in ((missing, f"--ca {missing}: No such file or directory"),
                     (key, f"--ca: no PEM certificate in {key}")):
        result = await cli_async(redis.url, "status", "--url", tls_health_server.url,
                                 "--ca", str(ca))
        assert result.returncode == 1
        assert result.stderr.strip() == f"redmessenger: {said}", result.stderr


@aiotest
async def test_status_exits_1_when_unavailable_or_unreachable(redis, health_server, free_port):
    health_server.answer(503, {**HEALTHY, "status": "unavailable",
                               "redis": {"connected": False, "subscribed": False}})
    result = await cli_async(redis.url, "status", "--url", health_server.url)
    assert result.returncode == 1
    assert "HTTP 503" in result.stdout and "status:       unavailable" in result.stdout
    assert "redis:        not connected, not subscribed" in result.stdout

    health_server.answer(500, b"<html>oops</html>")
    result = await cli_async(redis.url, "status", "--url", health_server.url)
    assert result.returncode == 1 and "not a health report" in result.stdout

    # No RedMessenger at all (and no Redis needed for status).
    result = await cli_async("redis://127.0.0.1:1/0", "status",
                             "--url", f"http://127.0.0.1:{free_port}")
    assert result.returncode == 1
    assert f"cannot reach RedMessenger at http://127.0.0.1:{free_port}/health" in result.stderr


@aiotest
async def test_status_of_a_real_redmessenger(messenger, private_redis):
    """The real /health (redmessenger/web.py), healthy, then with Redis gone;
    and the node as Redis lists it."""
    rm = await messenger()
    await rm.user("user1")
    url = rm.url.replace("ws://", "http://")
    out = ok(await cli_async(rm.redis.url, "status", "--url", url))
    assert "HTTP 200" in out and "status:       ok" in out
    assert f"node:         {rm.service.owner}" in out
    assert "connections:  1" in out and "users online: 1" in out

    # It describes itself with its lease, every second.
    info = f"rm:cluster:nodes:{rm.service.owner}:info"
    await eventually(lambda: json.loads(rm.redis.command("GET", info) or "{}").get(
        "connections") == 1, what="the node to describe its socket")
    doc = json.loads(ok(await cli_async(rm.redis.url, "status", "--json")))
    [node] = doc["nodes"]
    port = rm.service.port.getHost().port
    assert node == {"node": rm.service.owner, "host": socket.gethostname(), "pid": os.getpid(),
                    "worker": None, "listening": f"127.0.0.1:{port}", "connections": 1,
                    "users_online": 1, "version": __version__, "partitions": [0]}
    assert (doc["partitions"], doc["unheld"], doc["connections"], doc["users_online"]) == (
        1, [], 1, 1)

    other = await start_service(private_redis, shutdown_timeout=0.5)  # its stop: Redis is gone
    try:
        private_redis.stop()
        await eventually(lambda: not (other.service.redis.connected
                                      or other.service.subscriber.subscribed),
                         what="both connections to notice the loss")
        result = await cli_async(rm.redis.url, "status", "--url",
                                 other.url.replace("ws://", "http://"))
        assert result.returncode == 1 and "HTTP 503" in result.stdout
        assert "redis:        not connected, not subscribed" in result.stdout
    finally:
        await other.stop()


def test_status_with_no_live_node_exits_1(redis):
    result = cli(redis.url, "status")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"redmessenger: no RedMessenger node is live on Redis at "
                             f"{redis.url} with prefix rm\n")
    result = cli(redis.url, "status", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout) == {"nodes": [], "partitions": 0, "unheld": [],
                                         "users_online": 0, "connections": 0}


def test_the_status_table_aligns_its_columns_and_warns_of_unheld_partitions():
    nodes = [NodeStatus("3f9c0e2a7b14", "web1", 41327, listening="10.0.0.1:8080",
                        connections=1200, users_online=1100, version="0.1.0",
                        partitions=[0, 1, 2, 3, 8]),
             NodeStatus("a0b1c2d3e4f5", "web2.example.com", 7, worker=2,
                        listening="[::1]:8080", connections=5, users_online=5,
                        version="0.1.0"),
             NodeStatus("c0ffee000001", "web3", 9, partitions=[4])]  # not described yet
    assert status_table(ClusterStatus(nodes, 12, [5, 6, 7, 9, 10, 11], 1104)) == [
        "NODE          HOST                PID  WORKER  LISTENING      SOCKETS  USERS  "
        "PARTITIONS  VERSION",
        "3f9c0e2a7b14  web1              41327  -       10.0.0.1:8080     1200   1100  "
        "0-3,8       0.1.0",
        "a0b1c2d3e4f5  web2.example.com      7  2       [::1]:8080           5      5  "
        "-           0.1.0",
        "c0ffee000001  web3                  9  -       -                    -      -  "
        "4           -",
        "3 nodes live: 1205 sockets, 1104 users online; 12 storer partitions, 6 held by a "
        "live node.",
        "Warning: no live node holds storer partition(s) 5-7,9-11: a plain PUBLISH to their "
        "users with no socket is stored by nobody until a node takes them (live nodes look for "
        "vacant ones every second).",
    ]
    one = NodeStatus("3f9c0e2a7b14", "web1", 41327, listening="127.0.0.1:8080", connections=1,
                     users_online=1, version="0.1.0", partitions=[0])
    assert status_table(ClusterStatus([one], 1, [], 1))[-1] == (
        "1 node live: 1 socket, 1 user online; 1 storer partition, each held by a live node.")


@pytest.fixture(autouse=True)
def _no_reactor_left_running_by_main():
    """``main`` must never run or stop the test's reactor in-process."""
    from twisted.internet import reactor

    yield
    assert reactor.running

