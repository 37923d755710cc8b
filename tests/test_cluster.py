"""Several nodes on one Redis act as one server: every test runs real
``twistd`` nodes (tests/cluster.py) with clients and the publisher on
different nodes, and counts what goes in and what comes out."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from contextlib import ExitStack

from websockets.exceptions import ConnectionClosed

from redmessenger.presence import LEAVING_TIMEOUT

from cluster import Cluster, payloads, receive
from deployed import START_TIMEOUT, TwistdProcess, client, hello, recv_json, wait_for
from network import HOST, pick_free_port


def test_users_spread_over_nodes_get_each_message_once_and_offline_ones_are_stored_once(
        tmp_path, redis) -> None:
    with Cluster(tmp_path, redis) as cluster:
        nodes = cluster.start(3)
        online = [f"u{i}" for i in range(6)]
        offline = ["o1", "o2", "o3"]
        with nodes[0].user("u0") as u0, nodes[0].user("u1") as u1, \
                nodes[1].user("u2") as u2, nodes[1].user("u3") as u3, \
                nodes[2].user("u4") as u4, nodes[2].user("u5") as u5:
            sockets = [u0, u1, u2, u3, u4, u5]
            for i in range(50):
                for uid in online + offline:
                    cluster.publish(f"rm.users.{uid}", f"{uid}-{i}")
            for uid in online:
                cluster.publish(f"rm.users.{uid}", "end")
            for uid, ws in zip(online, sockets, strict=True):
                # In order, each once: a copy would come before "end".
                assert payloads(receive(ws, 51)) == [f"{uid}-{i}" for i in range(50)] + ["end"]
            for uid in offline:
                wait_for(lambda uid=uid: len(cluster.queue(uid)) >= 50, f"{uid}'s stores")
                assert cluster.queue(uid) == [f"{uid}-{i}" for i in range(50)]
            for uid in online:
                assert cluster.queue(uid) == []


def test_a_user_on_two_nodes_gets_everything_on_both_and_one_bubble(tmp_path, redis) -> None:
    with Cluster(tmp_path, redis) as cluster:
        nodes = cluster.start(3)
        with nodes[1].user("u") as older, nodes[2].user("u") as newer:
            for i in range(20):
                cluster.publish("rm.users.u", str(i))
            on_older, on_newer = receive(older, 20), receive(newer, 20)
            assert payloads(on_older) == payloads(on_newer) == [str(i) for i in range(20)]
            assert not any(f["bubble"] for f in on_older)
            assert all(f["bubble"] for f in on_newer)
        wait_for(lambda: not redis.command("EXISTS", "rm:presence:u"), "the sockets to leave")
        cluster.publish("rm.users.u", "stored")
        wait_for(lambda: cluster.queue("u") == ["stored"], "the store, once")


def test_the_socket_limit_holds_across_nodes(tmp_path, redis) -> None:
    with Cluster(tmp_path, redis, "--max-sockets-per-user", "2") as cluster:
        nodes = cluster.start(3)
        with nodes[0].user("u") as first, nodes[1].user("u") as second, \
                nodes[2].user("u") as third:
            try:
                while True:
                    frame = recv_json(first)
                    assert frame["type"] == "error", frame
            except ConnectionClosed as closed:
                assert closed.rcvd.code == 4009
            assert frame["code"] == "too_many_sockets"
            cluster.publish("rm.users.u", "hello")
            assert payloads(receive(second, 1)) == payloads(receive(third, 1)) == ["hello"]


def test_a_group_reaches_members_on_every_node_and_is_stored_once_for_the_others(
        tmp_path, redis) -> None:
    with Cluster(tmp_path, redis) as cluster:
        nodes = cluster.start(3)
        redis.command("SADD", "rm:groups:g:members", "a", "b", "c", "offline")
        with nodes[0].user("a") as a, nodes[1].user("b") as b, nodes[2].user("c") as c:
            for i in range(10):
                cluster.publish("rm.groups.g", str(i))
            for ws in (a, b, c):
                assert payloads(receive(ws, 10)) == [str(i) for i in range(10)]
            wait_for(lambda: len(cluster.queue("offline")) >= 10, "the stores")
            assert cluster.queue("offline") == [str(i) for i in range(10)]
            for uid in "abc":
                assert cluster.queue(uid) == []


def test_a_node_that_stops_hands_its_storing_over_with_nothing_lost_or_stored_twice(
        tmp_path, redis) -> None:
    """The first node stores for every offline user; it is stopped with
    SIGTERM while messages for an offline user flow: the next node takes
    over from the exact point the first one stops at."""
    with Cluster(tmp_path, redis) as cluster:
        first, second = cluster.start(2)
        published = []
        done = threading.Event()

        def publish() -> None:
            i = 0
            while not done.is_set():
                cluster.publish("rm.users.offline", str(i))
                published.append(str(i))
                i += 1

        publisher = threading.Thread(target=publish)
        publisher.start()
        try:
            wait_for(lambda: len(cluster.queue("offline")) >= 100, "stores by the first node")
            first.stop()
            assert "handed over by its holder" in second.log()
            count = len(published)
            wait_for(lambda: len(published) > count + 100, "more messages")
        finally:
            done.set()
            publisher.join()
        wait_for(lambda: len(cluster.queue("offline")) >= len(published), "every store")
        assert cluster.queue("offline") == published


def test_a_node_killed_loses_nothing_in_ack_mode_and_its_storing_is_taken_over(
        tmp_path, redis) -> None:
    """The first node stores for everyone and holds an ack-mode user with
    messages unacknowledged; it is killed. Within the lease time another
    node takes over its storing, and the user, reconnecting there, gets
    every message it had not acknowledged."""
    with Cluster(tmp_path, redis) as cluster:
        first, second = cluster.start(2)
        with first.user("u", ack=True) as u:
            for i in range(100):
                cluster.publish("rm.users.u", str(i))
            frames = receive(u, 100)
            u.send(json.dumps({"type": "ack", "tag": frames[39]["tag"]}))

            def claimed() -> int:
                return sum(redis.command("LLEN", key)
                           for key in redis.command("KEYS", "rm:users:u:taking:*"))

            wait_for(lambda: claimed() == 60, "the ack to settle the first 40")
            first.kill()
        wait_for(lambda: "Storing for the offline users of partition 0" in second.log(),
                 "the second node to take the storing over", 10)
        wait_for(lambda: "sockets left" in second.log(), "the dead node's sockets to go")
        cluster.publish("rm.users.offline", "after")
        with second.user("u", ack=True) as u:
            again = receive(u, u.welcome["queued"])
            assert payloads(again) == [str(i) for i in range(40, 100)]
        wait_for(lambda: cluster.queue("offline") == ["after"], "the store by the new storer")


def test_a_user_hopping_between_nodes_in_ack_mode_loses_nothing(tmp_path, redis) -> None:
    with Cluster(tmp_path, redis) as cluster:
        nodes = cluster.start(3)
        total = 1000
        done = threading.Event()

        def publish() -> None:
            for i in range(total):
                cluster.publish("rm.users.u", str(i))
                if i % 10 == 0:
                    time.sleep(0.02)  # about 2 s in all: the hops happen mid-flow
            done.set()

        publisher = threading.Thread(target=publish)
        publisher.start()
        seen: set[str] = set()
        hops = hops_in_flow = 0
        try:
            while len(seen) < total:
                node = nodes[hops % 3]
                hops += 1
                with node.user("u", ack=True) as u:
                    got = []
                    deadline = time.monotonic() + 0.2
                    while time.monotonic() < deadline or (done.is_set() and len(seen) < total):
                        try:
                            frame = json.loads(u.recv(timeout=0.2))
                        except TimeoutError:
                            if done.is_set():
                                break
                            continue
                        if frame["type"] == "message":
                            got.append(frame)
                            seen.add(frame["payload"])
                            if len(seen) == total:
                                break
                    numbers = [int(f["payload"]) for f in got]
                    assert numbers == sorted(numbers), "out of order on one connection"
                    if got:
                        u.send(json.dumps({"type": "ack", "tag": got[-1]["tag"]}))
                # The next connection comes once this one is gone: what it
                # held unacknowledged is back in the queue when its leave is
                # recorded (with two open at once, what the first held comes
                # to the second after what it got meanwhile, as on one node:
                # docs/guarantees.rst).
                wait_for(lambda: not redis.command("EXISTS", "rm:presence:u"), "the leave")
                if not done.is_set():
                    hops_in_flow = hops
                assert hops < 200, f"only {len(seen)} of {total} after {hops} hops"
        finally:
            publisher.join()
        assert seen == {str(i) for i in range(total)}
        assert hops_in_flow >= 4  # on each of the three nodes, while messages flowed


def test_workers_of_one_command_act_as_one_server(tmp_path, redis) -> None:
    """``--workers 2``: two nodes on one port, users landing on either."""
    port = pick_free_port()
    args = ["-n", "--pidfile=", "redmessenger", "--workers", "2", "--port",
            f"tcp:{port}:interface={HOST}", "--redis", redis.url, "--auth", "off"]
    with TwistdProcess(args, tmp_path, tmp_path / "workers.log") as twistd:
        wait_for(lambda: len(set(re.findall(r" worker (\d) pid \d+\] Subscribed to ",
                                            twistd.log()))) == 2,
                 "both workers to be ready", START_TIMEOUT, twistd.alive)
        with ExitStack() as stack:
            users = {}

            def held_by() -> set[str]:
                return set(re.findall(r" worker (\d) pid \d+\] Assigning id u\d+ ",
                                      twistd.log()))

            def another() -> bool:
                """Connections stay open until both workers hold users."""
                ws = stack.enter_context(client(port))
                hello(ws, {"id": f"u{len(users)}"})
                users[f"u{len(users)}"] = ws
                return len(users) >= 4 and held_by() == {"1", "2"}

            wait_for(another, "users on both workers", START_TIMEOUT)
            for i in range(30):
                for uid in [*users, "offline"]:
                    redis.command("PUBLISH", f"rm.users.{uid}", f"{uid}-{i}")
            for uid, ws in users.items():
                redis.command("PUBLISH", f"rm.users.{uid}", "end")
                assert payloads(receive(ws, 31)) == [f"{uid}-{i}" for i in range(30)] + ["end"]
        wait_for(lambda: len(Cluster.queue_of(redis, "offline")) >= 30, "the stores")
        assert Cluster.queue_of(redis, "offline") == [f"offline-{i}" for i in range(30)]
        twistd.stop()
        twistd.assert_stopped_cleanly()


def test_the_inbox_reader_killed_mid_flow_loses_nothing_and_stores_nothing_twice(
        tmp_path, redis) -> None:
    """The node that reads the inbox (it stores for partition 0) is killed
    while entries flow; another takes its place and handles what it had
    read first. Users on the other nodes get every entry once, in order,
    and an offline user's queue has each once, in order."""
    with Cluster(tmp_path, redis, "--inbox") as cluster:
        reader, second, third = cluster.start(3)
        total = 400

        def add(n: int) -> None:
            for i, uid in enumerate(("a", "b", "offline")):
                redis.command("XADD", "rm:inbox", f"{n + 1}-{i}", "to", f"users.{uid}",
                              "payload", str(n))

        with second.user("a") as a, third.user("b") as b:
            for n in range(100):
                add(n)
            wait_for(lambda: len(cluster.queue("offline")) > 10, "the inbox to be read")
            reader.kill()
            for n in range(100, total):
                add(n)
            expected = [str(n) for n in range(total)]
            for ws in (a, b):
                assert payloads(receive(ws, total)) == expected
        wait_for(lambda: len(cluster.queue("offline")) >= total, "every store")
        assert cluster.queue("offline") == expected


def test_durable_publish_reaches_users_on_every_node_at_once(tmp_path, redis) -> None:
    from redmessenger.cli import DURABLE_PUBLISH
    from redmessenger.publish import durable_publish_arguments

    def send(user: str | None = None, group: str | None = None) -> list:
        _, args = durable_publish_arguments(b"hello", user=user, group=group, prefix="rm",
                                            queue_ttl=0, queue_max=0)
        return redis.command("EVAL", DURABLE_PUBLISH, 1, *args)

    with Cluster(tmp_path, redis) as cluster:
        nodes = cluster.start(2)
        redis.command("SADD", "rm:groups:g:members", "a", "b", "away")
        with nodes[0].user("a") as a, nodes[1].user("b") as b:
            # Woken: the node holding b, and the storer of b's partition
            # if that is the other node.
            woken, queues, _ = send(user="b")
            assert woken >= 1 and len(queues) == 1
            assert payloads(receive(b, 1)) == ["hello"]
            woken, queues, _ = send(group="g")
            assert woken >= 2 and len(queues) == 3
            assert payloads(receive(a, 1)) == payloads(receive(b, 1)) == ["hello"]
            wait_for(lambda: cluster.queue("a") == cluster.queue("b") == [], "the drains")
        assert cluster.queue("away") == ["hello"]


def test_a_node_that_starts_takes_its_share_of_the_storing_with_nothing_lost(
        tmp_path, redis) -> None:
    """Two partitions (user ids by their last byte: ``..1`` is in 1, ``..2``
    in 0). The first node holds both, with a user of each connected; when a
    second node starts, the first hands one partition over while messages
    flow to those users and to an offline user of each partition: each is
    delivered or stored exactly once, in order, and afterwards each node
    stores for one partition."""
    with Cluster(tmp_path, redis, "--partitions", "2") as cluster:
        [first] = cluster.start(1)
        assert redis.command("GET", "rm:cluster:partitions") == b"2"
        published: list[str] = []
        done = threading.Event()

        def publish() -> None:
            i = 0
            while not done.is_set():
                for uid in ("on1", "on2", "off1", "off2"):
                    cluster.publish(f"rm.users.{uid}", str(i))
                published.append(str(i))
                i += 1

        with first.user("on1") as on1, first.user("on2") as on2:
            publisher = threading.Thread(target=publish)
            publisher.start()
            try:
                [second] = cluster.start(1)
                wait_for(lambda: "handed over by its holder" in second.log(),
                         "the second node to take a partition", 10)
                count = len(published)
                wait_for(lambda: len(published) > count + 50, "more messages")
            finally:
                done.set()
                publisher.join()
            for ws in (on1, on2):
                assert payloads(receive(ws, len(published))) == published
        for uid in ("off1", "off2"):
            wait_for(lambda uid=uid: len(cluster.queue(uid)) >= len(published), "the stores")
            assert cluster.queue(uid) == published
        holders = {redis.command("GET", f"rm:cluster:storers:{k}") for k in (0, 1)}
        assert len(holders) == 2  # one partition each


def test_a_node_cut_off_by_silence_is_taken_over_and_fenced_when_it_comes_back(
        tmp_path, redis) -> None:
    """A node that goes silent (SIGSTOP: its connections stay open, nothing
    moves, as in a network partition) counts as dead once its lease
    expires: the other node takes its storing over. When it wakes, what it
    had heard and not yet stored is refused (its lease is gone), so nothing
    is stored twice, and it stops rather than act on a role it lost."""
    with Cluster(tmp_path, redis) as cluster:
        first, second = cluster.start(2)
        for i in range(50):
            cluster.publish("rm.users.offline", str(i))
        wait_for(lambda: len(cluster.queue("offline")) == 50, "the first node's stores")
        first.twistd.process.send_signal(signal.SIGSTOP)
        try:
            # Heard by the silent node too (its socket reads nothing, but
            # Redis queues it), and by nobody else until the takeover.
            for i in range(50, 60):
                cluster.publish("rm.users.offline", str(i))
            wait_for(lambda: "Storing for the offline users of partition 0" in second.log(),
                     "the second node to take the storing over", 10)
            for i in range(60, 100):
                cluster.publish("rm.users.offline", str(i))
        finally:
            first.twistd.process.send_signal(signal.SIGCONT)
        assert first.twistd.process.wait(timeout=20) == 1
        assert "lease expired" in first.log()
        wait_for(lambda: len(cluster.queue("offline")) >= 90, "the second node's stores")
        stored = cluster.queue("offline")
        assert len(stored) == len(set(stored)), "a message stored twice"
        assert stored[:50] == [str(i) for i in range(50)]
        assert stored[-40:] == [str(i) for i in range(60, 100)]


def test_nodes_cut_off_together_by_a_long_redis_outage_do_not_count_each_other_dead(
        tmp_path, private_redis) -> None:
    """Redis away for longer than a lease (a restart, a failover): every
    node's lease lapses with it. The nodes come back at different moments
    (each has its own reconnect backoff); the first one back does not count
    the others as dead, but waits RECONNECT_GRACE for them to renew. Both
    serve on, and a message for an offline user is stored once."""
    from redmessenger.membership import LEASE_TTL

    with Cluster(tmp_path, private_redis) as cluster:
        first, second = cluster.start(2)
        private_redis.stop()
        time.sleep(LEASE_TTL + 1)  # the outage itself, not a wait for an event
        private_redis.start()
        for node in (first, second):
            wait_for(lambda node=node: "Counting nodes whose leases lapsed as dead again"
                     in node.log(), f"{node.name}'s grace to end", 4 * START_TIMEOUT,
                     node.twistd.alive)
        for node in (first, second):
            node.twistd.alive()
            assert "is gone (its lease expired)" not in node.log()
        owners = {bytes(o).decode() for o in private_redis.command("SMEMBERS", "rm:cluster:nodes")}
        assert len(owners) == 2
        assert all(private_redis.command("EXISTS", f"rm:procs:{o}") for o in owners)
        with second.user("u") as ws:
            cluster.publish("rm.users.u", "live")
            assert recv_json(ws)["payload"] == "live"
        cluster.publish("rm.users.offline", "stored")
        wait_for(lambda: cluster.queue("offline") == ["stored"], "the store")
        for node in (first, second):
            node.stop()


def test_a_user_moving_off_a_node_whose_writes_redis_holds_waits_for_them_in_order(
        tmp_path, private_redis, redis_factory) -> None:
    """A user's socket leaves a live node while that node's take of the
    user's queue is held (here its replica stops answering ``WAIT`` under
    ``--redis-replicas-ack``), and the user comes back on another node. The
    first node gives back what it took once its take is done; the other
    waits for that however long past LEAVING_TIMEOUT, for the first
    node's lease lives: newer messages then come after the older ones."""
    private_redis.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")
    replica = redis_factory(tmp_path / "replica")
    replica.command("REPLICAOF", HOST, private_redis.port)
    wait_for(lambda: "master_link_status:up" in replica.command(
        "INFO", "replication", decode=True), "the replica to sync")
    with Cluster(tmp_path, private_redis) as cluster:
        held, other = cluster.start(1, "--redis-replicas-ack", "1")[0], cluster.start(1)[0]
        for i in range(10):
            cluster.publish("rm.users.u", str(i))
        wait_for(lambda: len(cluster.queue("u")) == 10, "the stores")
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            with client(held.port) as ws:
                ws.send(json.dumps({"type": "hello", "id": "u", "ack": True}))
                wait_for(lambda: cluster.queue("u") == [], "the held node's take")
            # Back once its leave is recorded (rather than as a second socket
            # open at once, whose messages may interleave: docs/guarantees.rst).
            wait_for(lambda: private_redis.command("SMEMBERS", "rm:leaving:u"), "the leave")
            with client(other.port) as ws:
                ws.send(json.dumps({"type": "hello", "id": "u", "ack": True}))
                for i in range(10, 15):
                    cluster.publish("rm.users.u", str(i))
                wait_for(lambda: "Still waiting for node(s)" in other.log(),
                         "the joining node to wait on", LEAVING_TIMEOUT + START_TIMEOUT)
                os.kill(replica.pid, signal.SIGCONT)
                assert recv_json(ws)["type"] == "welcome"
                assert payloads(receive(ws, 15)) == [str(i) for i in range(15)]
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        assert "stops waiting for its join" not in other.log()


def test_what_a_socket_held_reaches_the_user_s_socket_on_another_node_when_it_closes(
        tmp_path, redis) -> None:
    """Ack mode, a user on two nodes: the first socket drained the stored
    messages and acknowledged none, so the second (joined after) found the
    queue empty. When the first closes, what it held goes back to the queue
    and its node's gone (``G``) wakes the other node: the second socket gets
    it now, each once, in order, not at its next connect."""
    with Cluster(tmp_path, redis) as cluster:
        first, second = cluster.start(2)
        for i in range(10):
            cluster.publish("rm.users.u", str(i))
        wait_for(lambda: len(cluster.queue("u")) == 10, "the stores")
        with ExitStack() as both:
            held = both.enter_context(first.user("u", ack=True))
            assert payloads(receive(held, 10)) == [str(i) for i in range(10)]
            later = both.enter_context(second.user("u", ack=True))
            assert later.welcome["queued"] == 0
            held.close()
            assert payloads(receive(later, 10)) == [str(i) for i in range(10)]


def test_a_user_whose_sockets_died_with_their_node_is_stored_for_once_reaped(
        tmp_path, redis) -> None:
    """The reaper says a dead node's sockets left and are gone at once (the
    node's stores are fenced): the storer stores for their users from then
    on, without waiting for the node (LEAVING_TIMEOUT) as for a live one."""
    with Cluster(tmp_path, redis) as cluster:
        storer, doomed = cluster.start(2)
        with doomed.user("u"):
            doomed.kill()
        wait_for(lambda: "is gone (its lease expired): 1 of its sockets left" in storer.log(),
                 "the dead node to be reaped", START_TIMEOUT, storer.twistd.alive)
        cluster.publish("rm.users.u", "after")
        wait_for(lambda: cluster.queue("u") == ["after"], "the message to be stored",
                 LEAVING_TIMEOUT - 1)


def test_what_a_killed_node_held_reaches_its_users_already_back_on_another(
        tmp_path, redis) -> None:
    """An ack-mode user reconnects to another node at once, before the dead
    node's lease has expired: what the dead node held unacknowledged comes
    to it there once the node is reaped, without another connect."""
    with Cluster(tmp_path, redis) as cluster:
        storer, doomed = cluster.start(2)
        with doomed.user("u", ack=True) as u:
            for i in range(20):
                cluster.publish("rm.users.u", str(i))
            assert payloads(receive(u, 20)) == [str(i) for i in range(20)]  # never acked
            doomed.kill()
        with storer.user("u", ack=True) as u:
            for i in range(20, 25):
                cluster.publish("rm.users.u", str(i))
            got = payloads(receive(u, 25))
            assert sorted(got, key=int) == [str(i) for i in range(25)]
