"""A RedMessenger killed with ``kill -9`` in the middle of a drain: what it
held in its drain claims is put back by the next process that starts, in
order, and nothing waits for the dead process to come back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deployed import START_TIMEOUT, TwistdProcess, client, hello, recv_json, wait_for
from harness import aiotest, eventually
from network import HOST, pick_free_port

QUEUE = "rm:users:user1:messages"


def start(tmp_path: Path, name: str, port: int, redis, *extra: str) -> TwistdProcess:
    args = ["-n", "--pidfile=", "redmessenger", "--port", f"tcp:{port}:interface={HOST}",
            "--redis", redis.url, "--auth", "off", *extra]
    twistd = TwistdProcess(args, tmp_path, tmp_path / f"{name}.log")
    twistd.wait_accepting(port)
    wait_for(lambda: "Subscribed to" in twistd.log(), "the subscription", START_TIMEOUT,
             twistd.alive)
    return twistd


def test_claims_of_a_killed_process_come_back_in_order(tmp_path: Path, redis) -> None:
    redis.client().pipeline([("RPUSH", QUEUE, str(i)) for i in range(2000)])
    port = pick_free_port()
    # A small ack window pauses the drain with its claims held: a known
    # moment to kill the process in.
    with start(tmp_path, "first", port, redis, "--ack-window", "5", "--drain-chunk",
               "100") as first, client(port) as ws:
        assert hello(ws, {"id": "user1", "ack": True})["queued"] == 2000
        assert [recv_json(ws)["payload"] for _ in range(5)] == ["0", "1", "2", "3", "4"]
        wait_for(lambda: redis.command("KEYS", "rm:users:user1:taking:*"), "claims")
        os.kill(first.pid, signal.SIGKILL)
        first.process.wait()
    claimed = redis.command("KEYS", "rm:users:user1:taking:*")
    assert claimed and redis.command("LLEN", QUEUE) < 2000  # held only by the dead one
    # Its lease expires LEASE_TTL seconds after its last renewal;
    # rather than wait that long, let it expire now.
    for key in redis.command("KEYS", "rm:procs:*"):
        redis.command("DEL", key)

    with start(tmp_path, "second", port, redis) as second:
        wait_for(lambda: redis.command("LLEN", QUEUE) == 2000, "the claims to come back",
                 START_TIMEOUT, second.alive)
        assert redis.command("LRANGE", QUEUE, 0, -1) == [str(i).encode() for i in range(2000)]
        assert redis.command("KEYS", "rm:users:user1:taking:*") == []
        assert "Put back 200 messages that processes which died were draining" in second.log()
        with client(port) as ws:
            assert hello(ws, {"id": "user1"})["queued"] == 2000
            assert [recv_json(ws)["payload"] for _ in range(2000)] == \
                [str(i) for i in range(2000)]
        second.stop()


@aiotest
async def test_a_users_next_connect_takes_back_a_dead_claim_first(redis, messenger):
    """Without a restart: the claim of a process whose heartbeat is gone is
    found by the next take for that user, and goes first, in order."""
    rm = await messenger()
    await eventually(lambda: rm.service.recovery is not None and rm.service.recovery.called)
    claim = "rm:users:user1:taking:0123456789ab:7"
    redis.command("RPUSH", claim, "0", "1")
    redis.command("SADD", "rm:users:user1:claims", claim)
    redis.command("RPUSH", QUEUE, "2", "3")
    user1 = await rm.user("user1")
    assert user1.welcome["queued"] == 4
    assert [m["payload"] for m in await user1.messages(4)] == ["0", "1", "2", "3"]
    assert redis.command("EXISTS", claim, "rm:users:user1:claims") == 0


@pytest.mark.alone
@aiotest
async def test_a_live_process_claims_are_left_alone(redis, messenger):
    rm = await messenger()
    await eventually(lambda: redis.command("KEYS", "rm:procs:*"), what="our heartbeat")
    [ours] = redis.command("KEYS", "rm:procs:*")
    owner = ours.decode().rsplit(":", 1)[1]
    claim = f"rm:users:user1:taking:{owner}:999"
    redis.command("RPUSH", claim, "held")
    redis.command("SADD", "rm:users:user1:claims", claim)
    await rm.user("user1")  # its take must not take back a claim of a live process
    assert redis.command("LRANGE", claim, 0, -1) == [b"held"]


def test_drained_messages_a_client_never_acknowledged_survive_a_kill(tmp_path: Path,
                                                                    redis) -> None:
    """In ack mode a drained message stays claimed in Redis until acked: all
    300 were sent, none acked, the process is killed, and all come back, at
    once: the heartbeat says which process of which host it was, and a
    process started on that host sees it is gone."""
    redis.client().pipeline([("RPUSH", QUEUE, str(i)) for i in range(300)])
    port = pick_free_port()
    with start(tmp_path, "first", port, redis, "--drain-chunk", "100") as first, \
            client(port) as ws:
        assert hello(ws, {"id": "user1", "ack": True})["queued"] == 300
        assert [recv_json(ws)["payload"] for _ in range(300)] == [str(i) for i in range(300)]
        assert redis.command("LLEN", QUEUE) == 0  # all taken, held in claims
        os.kill(first.pid, signal.SIGKILL)
        first.process.wait()
    [heartbeat] = redis.command("KEYS", "rm:procs:*")  # not expired
    assert redis.command("GET", heartbeat).decode().endswith(f" {first.pid}")
    with start(tmp_path, "second", port, redis) as second:
        wait_for(lambda: redis.command("LLEN", QUEUE) == 300, "the claims to come back",
                 START_TIMEOUT, second.alive)
        assert redis.command("LRANGE", QUEUE, 0, -1) == [str(i).encode() for i in range(300)]
        assert f"Process {heartbeat.decode().rsplit(':', 1)[1]} of this host is gone" \
            in second.log()
        second.stop()


def test_live_messages_a_client_never_acknowledged_survive_a_kill(tmp_path: Path,
                                                                 redis) -> None:
    """In ack mode a live message is claimed in Redis before it is sent,
    and only its ack releases the claim."""
    port = pick_free_port()
    with start(tmp_path, "first", port, redis) as first, client(port) as ws:
        hello(ws, {"id": "user1", "ack": True})
        redis.client().pipeline([("PUBLISH", "rm.users.user1", str(i)) for i in range(100)])
        frames = [recv_json(ws) for _ in range(100)]
        assert [f["payload"] for f in frames] == [str(i) for i in range(100)]
        assert not any(f["queued"] for f in frames)  # live: never in the queue
        assert redis.command("LLEN", QUEUE) == 0
        os.kill(first.pid, signal.SIGKILL)
        first.process.wait()
    with start(tmp_path, "second", port, redis) as second:
        wait_for(lambda: redis.command("LLEN", QUEUE) == 100, "the claims to come back",
                 START_TIMEOUT, second.alive)
        assert [json.loads(e)["payload"] for e in
                redis.command("LRANGE", QUEUE, 0, -1)] == [str(i) for i in range(100)]
        second.stop()


def test_only_dead_processes_of_this_host_are_told_apart() -> None:
    from redmessenger.service import _died_here, _running_here

    here = socket.gethostname()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not _died_here("x", f"{here} {child.pid}")  # running
    finally:
        child.kill()
        child.wait()
    assert _died_here("x", f"{here} {child.pid}")  # gone
    assert not _died_here("x", f"elsewhere {child.pid}")  # another host: wait for the TTL
    assert _died_here("x", f"{here} {os.getpid()}")  # an earlier run with our pid
    _running_here.add("y")
    try:  # another service running in this very process
        assert not _died_here("y", f"{here} {os.getpid()}")
    finally:
        _running_here.discard("y")
    assert not _died_here("x", "garbage")


@aiotest
async def test_a_hello_waits_for_start_up_recovery(redis, messenger):
    """So that what dead processes held is back at the head of the queue
    before the user's first take."""
    from twisted.internet import defer

    rm = await messenger()
    held = defer.Deferred()
    rm.service.factory.recovered = lambda: held
    redis.command("RPUSH", QUEUE, "recovered")
    client = await rm.connect()
    await client.send_json({"id": "user1"})
    [socket] = await eventually(lambda: rm.service.factory.connections)
    await eventually(lambda: socket._hello is not None, what="the hello to be read")
    assert not rm.dispatcher.users
    held.callback(None)
    assert (await client.recv())["queued"] == 1
    assert [m["payload"] for m in await client.messages(1)] == ["recovered"]


def test_acknowledged_messages_do_not_come_back_after_a_kill(tmp_path: Path, redis) -> None:
    """An ack trims what it settles off the head of the drain's claim at
    once: a client that acked 50 of 200 drained messages before a
    ``kill -9`` gets only the other 150 again, not all 200."""
    redis.client().pipeline([("RPUSH", QUEUE, str(i)) for i in range(200)])
    port = pick_free_port()
    with start(tmp_path, "first", port, redis) as first, client(port) as ws:
        assert hello(ws, {"id": "user1", "ack": True})["queued"] == 200
        frames = [recv_json(ws) for _ in range(200)]
        assert [f["payload"] for f in frames] == [str(i) for i in range(200)]
        ws.send(json.dumps({"type": "ack", "tag": frames[49]["tag"]}))
        [claim] = wait_for(lambda: redis.command("KEYS", "rm:users:user1:taking:*"), "a claim")
        wait_for(lambda: redis.command("LLEN", claim) == 150, "the acked head to be trimmed",
                 START_TIMEOUT, first.alive)
        os.kill(first.pid, signal.SIGKILL)
        first.process.wait()
    for key in redis.command("KEYS", "rm:procs:*"):  # as if its heartbeat expired
        redis.command("DEL", key)
    with start(tmp_path, "second", port, redis) as second:
        with client(port) as ws:
            assert hello(ws, {"id": "user1"})["queued"] == 150
            assert [recv_json(ws)["payload"] for _ in range(150)] == \
                [str(i) for i in range(50, 200)]
        second.stop()
