"""RedMessenger behind Redis Sentinel: a master, its replica and three
Sentinels (tests/sentinels.py), RedMessenger a real ``twistd`` node with
``--redis redis+sentinel://...``, and a real WebSocket client."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sentinels import MASTER, Sentinels

from certificates import make_certificate
from commandline import cli, ok
from deployed import START_TIMEOUT, SUBSCRIBED, TwistdProcess, client, hello, recv_json, wait_for
from docsamples import http_get
from network import HOST, pick_free_port
from redisservers import TlsRedis, spawned_redis, tls_redis_server
from resp import RespClient

QUEUE = "rm:users:{}:messages"


@contextmanager
def node(tmp_path, url: str, *options: str) -> Iterator[tuple[TwistdProcess, int]]:
    """A twistd node on Redis behind these Sentinels, once subscribed."""
    port = pick_free_port()
    args = ["-n", "--pidfile=", "redmessenger", "--port", f"tcp:{port}:interface={HOST}",
            "--redis", url, "--auth", "off", *options]
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
                    # Cut off since the kill, it did not wait out its backoff.
                    assert "Connecting to the new master now" in twistd.log()
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


def replicas(port: int) -> dict:
    """What the node's /health says of --redis-replicas-ack (with 503 while
    it reconnects)."""
    _, _, body = http_get(f"http://{HOST}:{port}/health")
    return json.loads(body)["redis"]["replicas"]


def test_with_replicas_ack_a_store_the_replica_missed_survives_the_failover(tmp_path) -> None:
    """``--redis-replicas-ack 1``: a store the master took while its replica
    was cut off is not done (/health says so), so when the master dies and
    that replica is promoted without it, the node sends it again there.
    Once a replica is back, the user gets both messages, once each."""
    with Sentinels(tmp_path) as setup:
        with node(tmp_path, setup.url(), "--redis-replicas-ack", "1") as (twistd, port):
            master = setup.master.client()
            master.command("PUBLISH", "rm.users.u", "1")
            wait_for(lambda: payloads(master, "u") == ["1"], "the first store")
            wait_for(lambda: replicas(port) == {"wanted": 1, "late": False, "waiting": 0},
                     "the first store on the replica")
            # Cut the replica off: stopped, and its link dropped, so that
            # what the master takes now never reaches it.
            os.kill(setup.replica.pid, signal.SIGSTOP)
            try:
                master.command("CLIENT", "KILL", "TYPE", "replica")
                master.command("PUBLISH", "rm.users.u", "2")
                wait_for(lambda: replicas(port)["late"], "the node to wait for the replica")
                assert replicas(port)["waiting"] >= 1
                assert payloads(master, "u") == ["1", "2"]
                setup.master.stop(kill=True)
            finally:
                os.kill(setup.replica.pid, signal.SIGCONT)
            promoted = RespClient(setup.wait_promoted())
            wait_for(lambda: payloads(promoted, "u") == ["1", "2"],
                     "the store sent again to the new master", 2 * START_TIMEOUT, twistd.alive)
            setup.bring_back(setup.master)  # made the new master's replica by the Sentinels
            wait_for(lambda: replicas(port) == {"wanted": 1, "late": False, "waiting": 0},
                     "the replicas to catch up", 4 * START_TIMEOUT, twistd.alive)
            with client(port) as ws:
                assert hello(ws, {"id": "u"})["queued"] == 2
                assert [recv_json(ws)["payload"] for _ in range(2)] == ["1", "2"]
            assert "Only 0 of the 1 Redis replicas wanted took our writes" in twistd.log()
            twistd.stop()
            twistd.assert_stopped_cleanly()


def test_rediss_sentinel_speaks_tls_to_the_sentinel_and_to_the_master(tmp_path) -> None:
    """``rediss+sentinel://...?ca=``: a Sentinel and a master that speak
    only TLS (no plain port), checked against the test's own CA."""
    executable = tls_redis_server()
    if executable is None:
        if os.environ.get("REDMESSENGER_REQUIRE_TLS_REDIS") == "1":
            pytest.fail("no redis-server built with TLS on PATH (apt-get install redis-server)")
        pytest.skip("no redis-server built with TLS on PATH (apt-get install redis-server)")
    key, cert = make_certificate(tmp_path)
    tls = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
           str(cert), "--tls-auth-clients", "no", "--tls-replication", "yes"]
    master_port, sentinel_port = pick_free_port(), pick_free_port()
    master, sentinel = TlsRedis(master_port, cert), TlsRedis(sentinel_port, cert)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"sentinel monitor {MASTER} {HOST} {master_port} 1\n")
    with spawned_redis([executable, "--port", "0", "--tls-port", str(master_port), "--bind", HOST,
                        "--dir", str(tmp_path), "--save", "", *tls],
                       lambda: master.command("PING")), \
            spawned_redis([executable, str(conf), "--sentinel", "--port", "0", "--tls-port",
                           str(sentinel_port), "--bind", HOST, "--dir", str(tmp_path), *tls],
                          lambda: sentinel.command("PING")):
        url = f"rediss+sentinel://{HOST}:{sentinel_port}/{MASTER}/0?ca={cert}"
        with node(tmp_path, url) as (twistd, port):
            with client(port) as ws:
                hello(ws, {"id": "u"})
                master.command("PUBLISH", "rm.users.u", "live")
                assert recv_json(ws)["payload"] == "live"
            master.command("PUBLISH", "rm.users.offline", "stored")
            wait_for(lambda: [json.loads(e)["payload"] for e in master.command(
                "LRANGE", QUEUE.format("offline"), 0, -1)] == ["stored"], "the store")
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


def test_the_command_line_and_durable_publish_find_the_master_through_the_sentinels(
        tmp_path) -> None:
    """``redmessenger send`` and ``queue`` with a ``redis+sentinel://`` URL
    (here in ``REDMESSENGER_REDIS``), and ``durable_publish()`` with a
    client of ``redis_client()`` for the same URL (passwords included),
    before and after a failover."""
    from redmessenger.publish import durable_publish, redis_client

    with Sentinels(tmp_path, password="datapw", sentinel_password="sentpw") as setup:
        application = redis_client(setup.url())
        ok(cli(setup.url(), "send", "--user", "u", "before"))
        durable_publish(application, "published before", user="u")
        assert payloads(setup.data(setup.master.port), "u") == ["before", "published before"]
        setup.wait_replicated()
        promoted = setup.data(setup.kill_master())
        ok(cli(setup.url(), "send", "--user", "u", "after"))
        durable_publish(application, "published after", user="u")
        assert payloads(promoted, "u") == ["before", "published before", "after",
                                           "published after"]
        assert "published after" in ok(cli(setup.url(), "queue", "u"))


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
