"""``twistd redmessenger --workers 2`` as deployed (:mod:`deployed`): the
processes it runs, how they share the port, how they stop, die, are started
again, and outlive no supervisor.

The workers act as one server (docs/scaling.rst): tests/test_cluster.py
runs the delivery guarantees across them; these tests look at the
processes, and at live delivery.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from websockets.sync.client import ClientConnection

from deployed import (
    RECV_TIMEOUT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    TwistdProcess,
    assert_refused,
    client,
    closed,
    hello,
    recv_json,
    run_twistd,
    running_pid,
    stop_stray,
    wait_for,
)
from network import HOST, accepting, free_ports, pick_free_port
from resp import EmbeddedRedisClient

#: What the supervisor logs as it starts a worker, and a worker's lines.
STARTED = re.compile(r"Started worker (\d+) \(pid (\d+)\)")
SUBSCRIBED = re.compile(r" worker (\d+) pid (\d+)\] Subscribed to ")
EMBEDDED = re.compile(r"as redis-server\[(\d+)\]")


def workers(twistd: TwistdProcess) -> dict[int, int]:
    """Each worker's pid, the latest started, by number."""
    return {int(n): int(pid) for n, pid in STARTED.findall(twistd.log())}


def ready(twistd: TwistdProcess, count: int = 2) -> dict[int, int]:
    """Until each of ``count`` workers (as now started) has subscribed:
    their pids, by number."""

    def subscribed() -> dict[int, int] | None:
        started = workers(twistd)
        done = {(int(n), int(pid)) for n, pid in SUBSCRIBED.findall(twistd.log())}
        return started if len(started) == count and set(started.items()) <= done else None

    return wait_for(subscribed, f"{count} workers to subscribe", START_TIMEOUT, twistd.alive)


def accepted_by(twistd: TwistdProcess, ws: ClientConnection) -> tuple[int, int]:
    """The worker (number, pid) that logged this client's connection."""
    peer = rf"tcp4:127\.0\.0\.1:{ws.socket.getsockname()[1]}"
    line = re.compile(rf" worker (\d+) pid (\d+)\] Assigning id \S+ to socket {peer}\.")
    found = wait_for(lambda: line.search(twistd.log()), "the connection to be logged")
    return int(found.group(1)), int(found.group(2))


def health(port: int, context: ssl.SSLContext | None = None) -> dict:
    scheme = "https" if context else "http"
    with urllib.request.urlopen(f"{scheme}://{HOST}:{port}/health", timeout=RECV_TIMEOUT,
                                context=context) as response:
        assert response.status == 200
        return json.loads(response.read())


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Callable[..., TwistdProcess]]:
    """``supervisor(*options)``: ``twistd -n redmessenger --workers 2`` with
    these options, in a directory of its own. After the test, whatever it
    still runs is stopped: itself, its workers, its redis-server."""
    started: list[TwistdProcess] = []

    def start(*options: str) -> TwistdProcess:
        workdir = tmp_path / f"run{len(started)}"
        workdir.mkdir()
        twistd = TwistdProcess(["-n", "--pidfile=", "redmessenger", "--workers", "2", *options],
                               workdir, tmp_path / f"twistd{len(started)}.log")
        started.append(twistd)
        return twistd

    try:
        yield start
    finally:
        for twistd in started:
            twistd.__exit__(None, None, None)
            log = twistd.log()
            for pid in [*(int(p) for _, p in STARTED.findall(log)),
                        *map(int, EMBEDDED.findall(log))]:
                stop_stray(pid)


def tcp(port: int) -> str:
    return f"tcp:{port}:interface={HOST}"


def test_two_workers_accept_on_one_port(supervisor, redis) -> None:
    port = pick_free_port()
    twistd = supervisor("--port", tcp(port), "--redis", redis.url, "--auth", "off")
    pids = ready(twistd)
    assert sorted(pids) == [1, 2] and len(set(pids.values())) == 2
    assert twistd.pid not in pids.values()

    # Connections land on both: kept open, one after the other, until each
    # worker has accepted one.
    seen: set[tuple[int, int]] = set()
    with ExitStack() as clients:

        def another() -> bool:
            ws = clients.enter_context(client(port))
            hello(ws, f"user{len(seen)}")
            seen.add(accepted_by(twistd, ws))
            return len(seen) == 2

        wait_for(another, "both workers to accept a connection", START_TIMEOUT)
    assert seen == set(pids.items())
    assert health(port)["worker"] in pids

    # Live delivery, through whichever worker holds the socket.
    with client(port) as ws:
        hello(ws, "user1")
        # Heard by the worker that holds the user, and by the one that
        # stores for offline users, if that is the other one.
        assert redis.command("PUBLISH", "rm.users.user1", "through the shared port") in (1, 2)
        message = recv_json(ws)
        assert (message["payload"], message["queued"]) == ("through the shared port", False)


def test_sigterm_stops_every_worker_gracefully(supervisor, redis) -> None:
    port = pick_free_port()
    twistd = supervisor("--port", tcp(port), "--redis", redis.url, "--auth", "off")
    pids = ready(twistd)
    with client(port) as ws:
        hello(ws, "user1")
        twistd.terminate()
        frames, code = closed(ws)
    assert code == 1001 and frames[0]["code"] == "shutting_down"
    assert twistd.stop() in (0, -signal.SIGTERM)  # twistd ends as it was ended
    twistd.assert_stopped_cleanly()
    log = twistd.log()
    assert log.count("] RedMessenger stopped") == 2, log
    assert not [pid for pid in pids.values() if running_pid(pid)]
    assert not accepting(port)
    assert "starting it again" not in log, log


def test_a_killed_worker_is_started_again_and_the_port_keeps_serving(supervisor, redis) -> None:
    port = pick_free_port()
    twistd = supervisor("--port", tcp(port), "--redis", redis.url, "--auth", "off")
    before = ready(twistd)
    os.kill(before[1], signal.SIGKILL)
    with client(port) as ws:  # the other worker, or the restarted one
        assert hello(ws, "user1")["type"] == "welcome"
    wait_for(lambda: workers(twistd)[1] != before[1], "worker 1 to be started again",
             START_TIMEOUT, twistd.alive)
    after = ready(twistd)
    assert after[2] == before[2] and after[1] != before[1]
    assert not running_pid(before[1])
    log = twistd.log()
    assert f"Worker 1 (pid {before[1]}) ended by signal 9" in log, log
    assert "starting it again in 0.5 s" in log, log
    with client(port) as ws:
        assert hello(ws, "user1")["type"] == "welcome"
    assert twistd.stop() in (0, -signal.SIGTERM)
    assert not running_pid(after[1])


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(supervisor, redis) -> None:
    port = pick_free_port()
    twistd = supervisor("--port", tcp(port), "--redis", redis.url, "--auth", "off")
    pids = ready(twistd)
    twistd.process.kill()
    twistd.process.wait()
    wait_for(lambda: not any(running_pid(pid) for pid in pids.values()),
             "the workers to exit", STOP_TIMEOUT)
    assert not accepting(port)


def test_the_workers_share_the_embedded_redis(supervisor, tmp_path: Path) -> None:
    port, embedded_port = free_ports(2)
    twistd = supervisor("--port", tcp(port), "--embedded-port", str(embedded_port),
                        "--auth", "off")
    pids = ready(twistd)
    [server] = map(int, EMBEDDED.findall(twistd.log()))
    data_dir = tmp_path / "run0" / "redmessenger-data"
    redis = EmbeddedRedisClient(embedded_port, data_dir)
    # The workers were given the password, out of sight of ps.
    password = (data_dir / "redis-password").read_text().strip()
    assert not [pid for pid in pids.values()
                if password in Path(f"/proc/{pid}/cmdline").read_text()]
    listening = rf"\] RedMessenger .* listening on .*; Redis at redis://{HOST}:{embedded_port}/0"
    assert len(re.findall(listening, twistd.log())) == 2, twistd.log()
    with client(port) as ws:
        hello(ws, "user1")
        assert redis.command("PUBLISH", "rm.users.user1", "Hello, world!") in (1, 2)
        assert recv_json(ws)["payload"] == "Hello, world!"
        twistd.terminate()
        assert closed(ws)[1] == 1001
    twistd.stop()
    twistd.assert_stopped_cleanly()
    wait_for(lambda: not running_pid(server), "the embedded redis-server to exit")
    assert not accepting(embedded_port)


def test_an_ssl_port_is_shared_and_each_worker_speaks_tls(supervisor, redis,
                                                         certificate) -> None:
    key, cert = certificate
    port = pick_free_port()
    twistd = supervisor("--port", f"ssl:{port}:privateKey={key}:certKey={cert}:interface={HOST}",
                        "--redis", redis.url, "--auth", "off")
    pids = ready(twistd)
    assert health(port, ssl.create_default_context(cafile=str(cert)))["worker"] in pids
    twistd.stop()
    twistd.assert_stopped_cleanly()


def test_a_port_that_workers_cannot_share_is_refused(tmp_path: Path, redis) -> None:
    result = run_twistd(["-n", "redmessenger", "--workers", "2", "--port",
                         f"unix:{tmp_path / 'socket'}", "--redis", redis.url], tmp_path)
    assert_refused(result, "--workers needs a tcp or ssl --port")
