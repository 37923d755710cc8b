"""RedMessenger behind Redis Sentinel: a master, its replica and three
Sentinels (tests/sentinels.py), RedMessenger a real ``twistd`` node with
``--redis redis+sentinel://...``, and a real WebSocket client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sentinels import MASTER, Sentinels

from commandline import cli, ok
from deployed import START_TIMEOUT, SUBSCRIBED, TwistdProcess, client, hello, recv_json, wait_for
from network import HOST, pick_free_port
from resp import RespClient

QUEUE = "rm:users:{}:messages"


@contextmanager
def node(tmp_path, url: str) -> Iterator[tuple[TwistdProcess, int]]:
    """A twistd node on Redis behind these Sentinels, once subscribed."""
    port = pick_free_port()
    args = ["-n", "--pidfile=", "redmessenger", "--port", f"tcp:{port}:interface={HOST}",
            "--redis", url, "--auth", "off"]
    with TwistdProcess(args, tmp_path, tmp_path / f"rm-{port}.log") as twistd:
        twistd.wait_accepting(port)
        twistd.wait_subscribed()
        yield twistd, port


def payloads(redis: RespClient, uid: str) -> list[str]:
    return [json.loads(entry)["payload"]
            for entry in redis.command("LRANGE", QUEUE.format(uid), 0, -1, decode=True)]


def live_again(ws, redis: RespClient, uid: str) -> dict:
    """Publish to ``uid`` on ``redis`` until ``ws`` gets one live (the node
    reconnects meanwhile); what it got."""
    deadline = time.monotonic() + 2 * START_TIMEOUT
    while True:
        redis.command("PUBLISH", f"rm.users.{uid}", "live")
        try:
            return json.loads(ws.recv(timeout=0.2))
        except TimeoutError:
            assert time.monotonic() < deadline, "no live message after the failover"


def test_a_node_follows_a_sentinel_failover_and_loses_nothing_stored(tmp_path) -> None:
    """SIGKILL the master: once the replica is promoted, the node delivers
    live again, what was stored before (and replicated) drains in order,
    new offline messages are stored on the new master, and an ack-mode
    user's unacknowledged messages come back."""
    with Sentinels(tmp_path) as setup:
        with node(tmp_path, setup.url()) as (twistd, port):
            master = setup.master.client()
            for i in range(5):
                master.command("PUBLISH", "rm.users.offline", str(i))
                master.command("PUBLISH", "rm.users.acker", str(i))
            wait_for(lambda: payloads(master, "offline") == [str(i) for i in range(5)],
                     "the offline messages to be stored")
            with client(port) as acker:
                hello(acker, {"id": "acker", "ack": True})
                got = [recv_json(acker)["payload"] for _ in range(5)]  # never acknowledged
                assert got == [str(i) for i in range(5)]
                setup.wait_replicated()
                with client(port) as online:
                    hello(online, {"id": "online"})
                    promoted = RespClient(setup.kill_master())
                    assert live_again(online, promoted, "online")["payload"] == "live"
            promoted.command("PUBLISH", "rm.users.later", "new")
            wait_for(lambda: payloads(promoted, "later") == ["new"],
                     "a new offline message stored on the new master")
            with client(port) as offline:
                welcome = hello(offline, {"id": "offline"})
                assert welcome["queued"] == 5
                assert [recv_json(offline)["payload"] for _ in range(5)] == [
                    str(i) for i in range(5)]
            with client(port) as acker:
                hello(acker, {"id": "acker", "ack": True})
                assert [recv_json(acker)["payload"] for _ in range(5)] == [
                    str(i) for i in range(5)]
            assert "Traceback" not in twistd.log(), twistd.log()
            twistd.stop()
            twistd.assert_stopped_cleanly()


def test_a_sentinel_down_or_naming_a_dead_master_changes_nothing(tmp_path) -> None:
    """Listed first: a Sentinel that is not there, and one whose master (of
    the same name) does not answer. The others are right, and the node
    serves as usual."""
    with Sentinels(tmp_path) as setup:
        dead = pick_free_port()
        stale = setup.start_sentinel(pick_free_port())
        with node(tmp_path, setup.url(dead, stale, setup.ports[0])) as (twistd, port):
            master = setup.master.client()
            with client(port) as ws:
                hello(ws, {"id": "u"})
                master.command("PUBLISH", "rm.users.u", "live")
                assert recv_json(ws)["payload"] == "live"
            master.command("PUBLISH", "rm.users.gone", "stored")
            wait_for(lambda: payloads(master, "gone") == ["stored"], "the message stored")
            twistd.stop()
            twistd.assert_stopped_cleanly()



def test_a_failover_that_keeps_the_old_master_up_is_followed_at_once(tmp_path) -> None:
    """``SENTINEL FAILOVER``: the old master stays up as a replica, so no
    connection is lost. The node hears ``+switch-master`` and reconnects
    to the new master: a message for an offline user is stored there, and
    an online user gets messages published on it."""
    with Sentinels(tmp_path) as setup:
        with node(tmp_path, setup.url()) as (twistd, port):
            old = setup.master.port
            assert setup.sentinel().command("SENTINEL", "FAILOVER", MASTER) == "OK"
            wait_for(lambda: setup.where_master() != old, "the Sentinels to fail over",
                     4 * START_TIMEOUT)
            promoted = RespClient(setup.where_master())
            wait_for(lambda: "The Sentinels moved master" in twistd.log(),
                     "the node to hear of it", START_TIMEOUT, twistd.alive)
            wait_for(lambda: twistd.log().count(SUBSCRIBED) == 2, "the node to subscribe again",
                     START_TIMEOUT, twistd.alive)
            with client(port) as ws:
                hello(ws, {"id": "online"})
                assert live_again(ws, promoted, "online")["payload"] == "live"
            promoted.command("PUBLISH", "rm.users.offline", "stored")
            wait_for(lambda: payloads(promoted, "offline") == ["stored"],
                     "the message stored on the new master")
            twistd.stop()
            twistd.assert_stopped_cleanly()


def test_the_command_line_finds_the_master_through_the_sentinels(tmp_path) -> None:
    """``redmessenger send`` and ``queue`` with a ``redis+sentinel://`` URL
    (here in ``REDMESSENGER_REDIS``), before and after a failover."""
    with Sentinels(tmp_path) as setup:
        ok(cli(setup.url(), "send", "--user", "u", "before"))
        assert payloads(setup.master.client(), "u") == ["before"]
        setup.wait_replicated()
        promoted = RespClient(setup.kill_master())
        ok(cli(setup.url(), "send", "--user", "u", "after"))
        assert payloads(promoted, "u") == ["before", "after"]
        assert "after" in ok(cli(setup.url(), "queue", "u"))


def test_passwords_for_the_data_nodes_and_for_the_sentinels(tmp_path) -> None:
    """``redis+sentinel://:pw@.../master?sentinel_password=...``: each kind
    of server gets its own password, failover included."""
    with Sentinels(tmp_path, password="datapw", sentinel_password="sentpw") as setup:
        with node(tmp_path, setup.url()) as (twistd, port):
            setup.data(setup.master.port).command("PUBLISH", "rm.users.u", "1")
            wait_for(lambda: payloads(setup.data(setup.master.port), "u") == ["1"],
                     "the store")
            setup.wait_replicated()
            promoted = setup.data(setup.kill_master())
            # What is published before the node subscribes again is lost
            # (plain pub/sub), as across a Redis restart.
            wait_for(lambda: twistd.log().count(SUBSCRIBED) == 2, "the node to subscribe again",
                     START_TIMEOUT, twistd.alive)
            promoted.command("PUBLISH", "rm.users.u", "2")
            wait_for(lambda: payloads(promoted, "u") == ["1", "2"], "the store after failover")
            twistd.stop()
            twistd.assert_stopped_cleanly()


def test_a_master_demoted_under_the_node_counts_as_lost(tmp_path) -> None:
    """The master made a replica (``REPLICAOF``) while the node is connected
    to it: its writes refused (READONLY), the node drops the connection and
    refuses to write to a replica (``ROLE``); the store waits, in order,
    and lands once the Sentinels name a master again."""
    with Sentinels(tmp_path) as setup:
        with node(tmp_path, setup.url()) as (twistd, port):
            master, replica = setup.master.client(), setup.replica.client()
            replica.command("REPLICAOF", "NO", "ONE")
            master.command("REPLICAOF", HOST, setup.replica.port)
            replica.command("PUBLISH", "rm.users.x", "1")  # heard through the old master
            wait_for(lambda: "it is a slave, not the master" in twistd.log(),
                     "the node to refuse the demoted master", START_TIMEOUT, twistd.alive)
            master.command("REPLICAOF", "NO", "ONE")
            replica.command("REPLICAOF", HOST, setup.master.port)

            def stored() -> bool:
                return payloads(RespClient(setup.where_master()), "x") == ["1"]

            wait_for(stored, "the store on the master the Sentinels name", 2 * START_TIMEOUT,
                     twistd.alive)
            twistd.stop()
            twistd.assert_stopped_cleanly()
