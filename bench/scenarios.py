"""The scenarios and baselines of the suite, how big each one is, and which
baselines each one's ratios need."""

from __future__ import annotations

import math
import os
import re
import signal
import time
import urllib.request
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from . import wire
from .checks import (
    check_clients,
    check_published,
    check_rm_log,
    deadline,
    leftovers,
    queue_contents,
    result,
    spread,
)
from .proc import HOST, BenchError, free_port, wait_until
from .resp import Redis
from .stage import START_TIMEOUT, Stage

if TYPE_CHECKING:
    from .runner import Bench

#: How long the coordinator polls Redis between checks while waiting.
POLL = 0.002


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; ``--smoke`` and ``--scale`` change them."""

    raw: int = 200_000
    live: int = 200_000
    live_users: int = 100
    group_members: int = 1_000
    group_online: int = 500
    group_messages: int = 1_000
    store: int = 200_000
    store_users: int = 100
    drain: int = 100_000
    drain_big: int = 1_000_000
    latency_rate: int = 10_000
    latency_seconds: float = 10.0
    latency_users: int = 100
    connections: int = 10_000
    failover_sockets: int = 10_000
    #: Of the failover sockets, ack-mode ones with messages in flight.
    failover_ack_users: int = 100
    failover_in_flight: int = 100
    #: Seconds over which failed-over clients spread their reconnects.
    failover_jitter: float = 1.0
    payload_size: int = wire.PAYLOAD_SIZE
    #: Handshakes a client keeps in flight (Twisted listens with a backlog of 50).
    concurrency: int = 50

    def scaled(self, factor: float) -> Sizes:
        def s(value: int) -> int:
            return max(1, int(value * factor))

        return replace(
            self,
            raw=s(self.raw),
            live=s(self.live),
            store=s(self.store),
            group_messages=s(self.group_messages),
            drain=s(self.drain),
            drain_big=s(self.drain_big),
            connections=s(self.connections),
            failover_sockets=s(self.failover_sockets),
            failover_ack_users=min(s(self.failover_ack_users), s(self.failover_sockets)),
            latency_seconds=max(0.5, self.latency_seconds * factor),
        )


FULL = Sizes()


SMOKE = Sizes(
    raw=2_000,
    live=2_000,
    live_users=10,
    group_members=40,
    group_online=20,
    group_messages=50,
    store=2_000,
    store_users=10,
    drain=2_000,
    drain_big=5_000,
    latency_rate=1_000,
    latency_seconds=1.0,
    latency_users=10,
    connections=200,
    failover_sockets=200,
    failover_ack_users=5,
    failover_in_flight=20,
    failover_jitter=0.2,
)


def sizes_dict(sizes: Sizes) -> dict:
    return asdict(sizes)


@dataclass
class Scenario:
    name: str
    kind: str  # "baseline" or "scenario"
    description: str
    run: Callable[[Bench], dict]
    needs: tuple[str, ...] = ()


def all_welcomed(opened: dict, count: int) -> None:
    """The clients' ``open`` reply says that all ``count`` were welcomed."""
    if opened["welcomed"] != count:
        raise BenchError(f"only {opened['welcomed']} of {count} connected: {opened['errors']}")


def uids_of(kind: str, count: int) -> list[str]:
    return [f"bench-{kind}-{index}" for index in range(count)]


def raw_recv(bench: Bench) -> dict:
    n = bench.sizes.raw
    with Stage(bench, "raw-recv") as stage:
        stage.start_redis()
        subscriber = stage.start_worker("rawsub", subject=True)
        subscriber.call(
            {
                "cmd": "subscribe",
                "port": stage.redis_port,
                "patterns": [f"{wire.PREFIX}.users.*", f"{wire.PREFIX}.groups.*"],
            },
            "subscribed",
            START_TIMEOUT,
        )
        publisher = stage.start_publisher(
            {
                "port": stage.redis_port,
                "n": n,
                "targets": [wire.user_channel("bench-u-0")],
                "payload_size": bench.sizes.payload_size,
                "timeout": deadline(n),
            }
        )
        snap0 = stage.snapshot()
        publisher.send({"cmd": "go"})
        published = publisher.receive("published", deadline(n) + 5)
        waited = subscriber.call(
            {"cmd": "wait", "total": n, "timeout": deadline(n)}, "waited", deadline(n) + 5
        )
        snap1 = stage.snapshot()
        checks: list[str] = []
        check_published(checks, published)
        if waited["seqsum"] != n * (n - 1) // 2 or waited["order_errors"]:
            checks.append("the subscriber got other messages than were published")
        return result(
            "raw-recv",
            sent=n,
            received=waited["received"],
            checks=checks,
            seconds=waited["t_target"] - published["t_start"],
            count=n,
            unit="msg/s",
            snap0=snap0,
            snap1=snap1,
            subject="rawsub",
            publish_rate=n / (published["t_sent"] - published["t_start"]),
        )


def raw_send(users: int) -> Callable[[Bench], dict]:
    def run(bench: Bench) -> dict:
        n = bench.sizes.raw
        name = f"raw-send-{users}"
        uids = uids_of("u", users)
        with Stage(bench, name) as stage:
            server = stage.start_worker("rawws", subject=True)
            port = free_port()
            server.call({"cmd": "listen", "port": port}, "listening", START_TIMEOUT)
            client = stage.start_worker("wsclient")
            opened = client.call(
                {"cmd": "open", "port": port, "uids": uids, "concurrency": bench.sizes.concurrency},
                "opened",
                START_TIMEOUT + 5,
            )
            all_welcomed(opened, users)
            snap0 = stage.snapshot()
            server.send(
                {"cmd": "send", "uids": uids, "n": n, "payload_size": bench.sizes.payload_size}
            )
            sent = server.receive("sent", deadline(n))
            waited = client.call(
                {"cmd": "wait", "total": n, "timeout": deadline(n), "settle": bench.settle},
                "waited",
                deadline(n) + 5,
            )
            snap1 = stage.snapshot()
            checks: list[str] = []
            expected = dict(zip(uids, spread(n, users), strict=True))
            received = check_clients(checks, waited, expected)
            return result(
                name,
                sent=n,
                received=received,
                checks=checks,
                seconds=waited["t_target"] - sent["t_start"],
                count=n,
                unit="msg/s",
                snap0=snap0,
                snap1=snap1,
                subject="rawws",
                send_loop_rate=n / (sent["t_end"] - sent["t_start"]),
            )

    return run


def raw_connect(bench: Bench) -> dict:
    """The floor under ``connections``: the same connects and hellos to a
    bare Autobahn server, which welcomes each with no Redis behind it."""
    n = bench.sizes.connections
    uids = uids_of("c", n)
    with Stage(bench, "raw-connect") as stage:
        server = stage.start_worker("rawws", subject=True)
        port = free_port()
        server.call({"cmd": "listen", "port": port}, "listening", START_TIMEOUT)
        client = stage.start_worker("wsclient")
        snap0 = stage.begin(server)
        limit = deadline(n, least_rate=100)
        opened = client.call(
            {"cmd": "open", "port": port, "uids": uids,
             "concurrency": bench.sizes.concurrency, "timeout": limit},
            "opened",
            limit + 5,
        )
        snap1 = stage.snapshot()
        stage.profile_stop()
        checks: list[str] = []
        if opened["failed"]:
            checks.append(f"{opened['failed']} connections failed: {opened['errors'][:3]}")
        client.call({"cmd": "close"}, "closed", 30)
        return result(
            "raw-connect",
            sent=n,
            received=opened["welcomed"],
            checks=checks,
            seconds=opened["t_last"] - opened["t_first"],
            count=opened["welcomed"],
            unit="conn/s",
            snap0=snap0,
            snap1=snap1,
            subject="rawws",
        )


@dataclass(frozen=True)
class Layout:
    """The nodes of a live scenario: how many (the first one started stores
    for every partition), which serve the users (spread over them
    round-robin) and which are measured (their CPU summed)."""

    nodes: int = 1
    serving: tuple[int, ...] = (0,)
    measured: tuple[int, ...] = (0,)


ONE_NODE = Layout()


def replicated(stage: Stage, replicas: int) -> tuple[str, ...]:
    """With ``replicas``: that many replicas of the stage's Redis, and
    RedMessenger's options to wait for them (``--redis-replicas-ack``)."""
    for _ in range(replicas):
        stage.start_replica()
    return ("--redis-replicas-ack", str(replicas)) if replicas else ()


def live(users: int, ack: bool = False, name: str = "", layout: Layout = ONE_NODE,
         replicas: int = 0, clients: str = "wsclient") -> Callable[[Bench], dict]:
    """``clients``: the load client's module (``eventsclient``: event streams)."""

    def run(bench: Bench) -> dict:
        n = bench.sizes.live
        users_now = bench.sizes.live_users if users != 1 else 1
        title = name or f"live-{users}" + ("-ack" if ack else "")
        uids = uids_of("u", users_now)
        with Stage(bench, title) as stage:
            redis = stage.start_redis()
            if layout.nodes == 1:
                stage.start_rm(*replicated(stage, replicas))
                nodes = stage.nodes
            else:
                nodes = stage.start_nodes(layout.nodes)
            measured = [nodes[i].process for i in layout.measured]
            client = stage.start_worker(clients)
            opened = client.call(
                {
                    "cmd": "open",
                    "port": [nodes[i].port for i in layout.serving],
                    "uids": uids,
                    "ack": ack,
                    "concurrency": bench.sizes.concurrency,
                },
                "opened",
                START_TIMEOUT + 5,
            )
            all_welcomed(opened, users_now)
            publisher = stage.start_publisher(
                {
                    "port": stage.redis_port,
                    "n": n,
                    "targets": [wire.user_channel(uid) for uid in uids],
                    "payload_size": bench.sizes.payload_size,
                    "timeout": deadline(n),
                }
            )
            snap0 = stage.begin(*measured)
            publisher.send({"cmd": "go"})
            published = publisher.receive("published", deadline(n) + 5)
            waited = client.call(
                {"cmd": "wait", "total": n, "timeout": deadline(n), "settle": bench.settle},
                "waited",
                deadline(n) + 5,
            )
            snap1 = stage.snapshot()
            stage.profile_stop()
            checks: list[str] = []
            check_published(checks, published)
            expected = dict(zip(uids, spread(n, users_now), strict=True))
            received = check_clients(checks, waited, expected)
            client.call({"cmd": "close"}, "closed", 15)
            for node in reversed(nodes):
                stage.stop(node.process)
            left = leftovers(redis, uids)
            if left:
                checks.append(
                    f"{left} messages were stored or given back to Redis "
                    "though every one was delivered" + (" and acked" if ack else "")
                )
            check_rm_log(checks, stage)
            found = result(
                title,
                sent=n,
                received=received,
                checks=checks,
                seconds=waited["t_target"] - published["t_start"],
                count=n,
                unit="msg/s",
                snap0=snap0,
                snap1=snap1,
                subject="+".join(process.name for process in measured),
                users=users_now,
                ack=ack,
                publish_rate=n / (published["t_sent"] - published["t_start"]),
            )
            if layout.nodes > 1:
                found["nodes"] = {
                    node.process.name: {
                        "storer": index == 0,
                        "serving": index in layout.serving,
                        "measured": index in layout.measured,
                        "us_per_message": found["cpu"][node.process.name] / n * 1e6,
                    }
                    for index, node in enumerate(nodes)
                }
            return found

    return run


def group(bench: Bench) -> dict:
    sizes = bench.sizes
    n, gid = sizes.group_messages, "bench-g"
    members = uids_of("m", sizes.group_members)
    online = members[: sizes.group_online]
    offline = members[sizes.group_online :]
    with Stage(bench, "group") as stage:
        redis = stage.start_redis()
        redis.command("RPUSH", wire.members_key(gid), *members)
        rm = stage.start_rm()
        client = stage.start_worker("wsclient")
        opened = client.call(
            {
                "cmd": "open",
                "port": stage.rm_port,
                "uids": online,
                "concurrency": sizes.concurrency,
            },
            "opened",
            START_TIMEOUT + 5,
        )
        all_welcomed(opened, len(online))
        deliveries, stores = n * len(online), n * len(offline)
        limit = deadline(deliveries + stores)
        publisher = stage.start_publisher(
            {
                "port": stage.redis_port,
                "n": n,
                "targets": [wire.group_channel(gid)],
                "payload_size": sizes.payload_size,
                "timeout": limit,
            }
        )
        snap0 = stage.begin(rm)
        publisher.send({"cmd": "go"})
        client.send({"cmd": "wait", "total": deliveries, "timeout": limit, "settle": bench.settle})
        # Stores are done when the last offline member has the last message
        # (RedMessenger writes in order on one connection): watch for that
        # while the client counts deliveries.
        last_queue = wire.queue_key(offline[-1]) if offline else None
        t_stores = 0.0 if last_queue else time.monotonic()
        end = time.monotonic() + limit
        waited = None
        while waited is None or not t_stores:
            if time.monotonic() > end:
                raise BenchError("timed out waiting for group deliveries and stores")
            if waited is None and client.ready():
                waited = client.receive("waited", 1)
            if not t_stores and redis.command("LLEN", last_queue) >= n:
                t_stores = time.monotonic()
            time.sleep(POLL)
        published = publisher.receive("published", limit)
        snap1 = stage.snapshot()
        stage.profile_stop()
        checks: list[str] = []
        check_published(checks, published)
        received = check_clients(checks, waited, {uid: (n, n * (n - 1) // 2) for uid in online})
        stored = queue_contents(redis, offline)
        wrong = [uid for uid in offline if stored[uid] != list(range(n))]
        if wrong:
            checks.append(
                f"{len(wrong)} offline members' queues are not the {n} messages "
                f"in order (e.g. {wrong[0]}: {len(stored[wrong[0]])} entries)"
            )
        stored_ok = sum(len(stored[uid]) for uid in offline)
        client.call({"cmd": "close"}, "closed", 15)
        check_rm_log(checks, stage)
        t_start = published["t_start"]
        t_end = max(waited["t_target"], t_stores)
        found = result(
            "group",
            sent=deliveries + stores,
            received=received + stored_ok,
            checks=checks,
            seconds=t_end - t_start,
            count=deliveries + stores,
            unit="copies/s",
            snap0=snap0,
            snap1=snap1,
            messages=n,
            members=len(members),
            online=len(online),
            deliveries=deliveries,
            stores=stores,
            delivered=received,
            stored=stored_ok,
        )
        found["deliveries_per_s"] = (
            deliveries / (waited["t_target"] - t_start) if waited["t_target"] > t_start else None
        )
        found["stores_per_s"] = stores / (t_stores - t_start) if stores else None
        return found


def store(name: str, replicas: int = 0) -> Callable[[Bench], dict]:
    return lambda bench: _store(bench, name, replicas)


def _store(bench: Bench, name: str, replicas: int) -> dict:
    n, users = bench.sizes.store, bench.sizes.store_users
    uids = uids_of("s", users)
    expected = spread(n, users)
    last_uid = uids[(n - 1) % users]
    with Stage(bench, name) as stage:
        redis = stage.start_redis()
        rm = stage.start_rm(*replicated(stage, replicas))
        publisher = stage.start_publisher(
            {
                "port": stage.redis_port,
                "n": n,
                "targets": [wire.user_channel(uid) for uid in uids],
                "payload_size": bench.sizes.payload_size,
                "timeout": deadline(n),
            }
        )
        snap0 = stage.begin(rm)
        publisher.send({"cmd": "go"})
        want = expected[(n - 1) % users][0]
        key = wire.queue_key(last_uid)
        wait_until(
            lambda: redis.command("LLEN", key) >= want,
            "the last store",
            deadline(n),
            rm.alive,
            interval=POLL,
        )
        t_end = time.monotonic()
        snap1 = stage.snapshot()
        stage.profile_stop()
        published = publisher.receive("published", deadline(n))
        checks: list[str] = []
        check_published(checks, published)
        stored = queue_contents(redis, uids)
        wrong = [
            uid for index, uid in enumerate(uids) if stored[uid] != list(range(index, n, users))
        ]
        if wrong:
            checks.append(
                f"{len(wrong)} queues are not their messages in order "
                f"(e.g. {wrong[0]}: {len(stored[wrong[0]])} entries)"
            )
        check_rm_log(checks, stage)
        return result(
            name,
            sent=n,
            received=sum(len(v) for v in stored.values()),
            checks=checks,
            seconds=t_end - published["t_start"],
            count=n,
            unit="stores/s",
            snap0=snap0,
            snap1=snap1,
            users=users,
        )


def fill_queue(redis: Redis, uid: str, n: int, size: int) -> None:
    """n envelopes in the user's queue, as RedMessenger would have stored them."""
    source = wire.user_channel(uid).encode()
    boot = os.urandom(8).hex().encode()
    timestamp = int(time.time() * 1000)
    key = wire.queue_key(uid)
    for first in range(0, n, 100_000):
        commands = []
        for start in range(first, min(n, first + 100_000), 1000):
            commands.append(
                (
                    "RPUSH",
                    key,
                    *(
                        wire.ENVELOPE
                        % (boot, seq + 1, source, timestamp, wire.payload(seq, 0, size))
                        for seq in range(start, min(n, start + 1000))
                    ),
                )
            )
        redis.pipeline(commands)


def drain(name: str, big: bool = False, ack: bool = False) -> Callable[[Bench], dict]:
    def run(bench: Bench) -> dict:
        n = bench.sizes.drain_big if big else bench.sizes.drain
        uid = "bench-d-0"
        with Stage(bench, name) as stage:
            redis = stage.start_redis()
            fill_queue(redis, uid, n, bench.sizes.payload_size)
            rm = stage.start_rm()
            time.sleep(bench.settle)
            before = rm.memory()
            client = stage.start_worker("wsclient")
            snap0 = stage.begin(rm)
            opened = client.call(
                {"cmd": "open", "port": stage.rm_port, "uids": [uid], "ack": ack},
                "opened",
                START_TIMEOUT,
            )
            if opened["welcomed"] != 1:
                raise BenchError(f"could not connect: {opened['errors']}")
            waited = client.call(
                {"cmd": "wait", "total": n, "timeout": deadline(n), "settle": bench.settle},
                "waited",
                deadline(n) + 5,
            )
            snap1 = stage.snapshot()
            stage.profile_stop()
            after = rm.memory()
            checks: list[str] = []
            if opened["queued"] != n:
                checks.append(f"the welcome said {opened['queued']} queued, not {n}")
            received = check_clients(checks, waited, {uid: (n, n * (n - 1) // 2)})
            client.call({"cmd": "close"}, "closed", 15)
            stage.stop_rm()
            left = leftovers(redis, [uid])
            if left:
                checks.append(f"{left} messages left in Redis after the drain")
            check_rm_log(checks, stage)
            return result(
                name,
                sent=n,
                received=received,
                checks=checks,
                seconds=waited["t_target"] - opened["t_first_hello"],
                count=n,
                unit="msg/s",
                snap0=snap0,
                snap1=snap1,
                ack=ack,
                rss_before=before["VmRSS"],
                rss_after=after["VmRSS"],
                rss_peak=after["VmHWM"],
                rss_growth=after["VmHWM"] - before["VmRSS"],
            )

    return run


def latency(name: str, ack: bool = False, replicas: int = 0, load: float = 1.0
            ) -> Callable[[Bench], dict]:
    """``load``: the share of the ``latency`` scenario's rate to send."""
    return lambda bench: _latency(bench, name, ack, replicas, load)


def _latency(bench: Bench, name: str, ack: bool, replicas: int, load: float) -> dict:
    sizes = bench.sizes
    rate, users = int(sizes.latency_rate * load), sizes.latency_users
    n = int(rate * sizes.latency_seconds)
    uids = uids_of("l", users)
    with Stage(bench, name) as stage:
        stage.start_redis()
        rm = stage.start_rm(*replicated(stage, replicas))
        client = stage.start_worker("wsclient")
        opened = client.call(
            {
                "cmd": "open",
                "port": stage.rm_port,
                "uids": uids,
                "latency": True,
                "ack": ack,
                "concurrency": sizes.concurrency,
            },
            "opened",
            START_TIMEOUT + 5,
        )
        all_welcomed(opened, users)
        limit = sizes.latency_seconds + deadline(n)
        publisher = stage.start_publisher(
            {
                "port": stage.redis_port,
                "n": n,
                "rate": rate,
                "targets": [wire.user_channel(uid) for uid in uids],
                "payload_size": sizes.payload_size,
                "timeout": limit,
            }
        )
        snap0 = stage.begin(rm)
        publisher.send({"cmd": "go"})
        published = publisher.receive("published", limit + 5)
        samples_path = bench.out / f"{name}-samples{bench.suffix}.bin"
        waited = client.call(
            {
                "cmd": "wait",
                "total": n,
                "timeout": deadline(n),
                "settle": bench.settle,
                "latency_file": str(samples_path),
            },
            "waited",
            deadline(n) + 5,
        )
        snap1 = stage.snapshot()
        stage.profile_stop()
        checks: list[str] = []
        check_published(checks, published)
        received = check_clients(checks, waited, dict(zip(uids, spread(n, users), strict=True)))
        samples = array("q")
        with open(samples_path, "rb") as f:
            samples.frombytes(f.read())
        ordered = sorted(samples)
        client.call({"cmd": "close"}, "closed", 15)
        check_rm_log(checks, stage)
        seconds = waited["t_target"] - published["t_start"]
        return result(
            name,
            sent=n,
            received=received,
            checks=checks,
            seconds=seconds,
            count=n,
            unit="msg/s",
            snap0=snap0,
            snap1=snap1,
            users=users,
            requested_rate=rate,
            samples=len(ordered),
            **{f"p{label}_ms": percentile(ordered, q) / 1e6 for label, q in PERCENTILES},
            max_ms=ordered[-1] / 1e6 if ordered else None,
            samples_file=samples_path.name,
        )


PERCENTILES = (("50", 0.50), ("90", 0.90), ("99", 0.99), ("99.9", 0.999))


def percentile(ordered: list[int], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def connections(bench: Bench) -> dict:
    n = bench.sizes.connections
    uids = uids_of("c", n)
    with Stage(bench, "connections") as stage:
        stage.start_redis()
        rm = stage.start_rm()
        time.sleep(bench.settle)
        before = rm.memory()
        client = stage.start_worker("wsclient")
        snap0 = stage.begin(rm)
        limit = deadline(n, least_rate=100)
        opened = client.call(
            {
                "cmd": "open",
                "port": stage.rm_port,
                "uids": uids,
                "concurrency": bench.sizes.concurrency,
                "timeout": limit,
            },
            "opened",
            limit + 5,
        )
        snap1 = stage.snapshot()
        stage.profile_stop()
        time.sleep(max(bench.settle, 0.5))
        after = rm.memory()
        checks: list[str] = []
        if opened["failed"]:
            checks.append(f"{opened['failed']} connections failed: {opened['errors'][:3]}")
        welcomed = opened["welcomed"]
        client.call({"cmd": "close"}, "closed", 30)
        check_rm_log(checks, stage)
        found = result(
            "connections",
            sent=n,
            received=welcomed,
            checks=checks,
            seconds=opened["t_last"] - opened["t_first"],
            count=welcomed,
            unit="conn/s",
            snap0=snap0,
            snap1=snap1,
            rss_before=before["VmRSS"],
            rss_after=after["VmRSS"],
        )
        found["rss_per_connection"] = (
            (after["VmRSS"] - before["VmRSS"]) / welcomed if welcomed else None
        )
        return found


def longest_renewal_gap(port: int) -> float:
    """The node's longest time between two renewals of its lease: how close
    a storm brought it to counting as dead."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(r"^redmessenger_lease_renewal_gap_max_seconds (\S+)$", text, re.MULTILINE)
    if found is None:
        raise BenchError("no redmessenger_lease_renewal_gap_max_seconds in /metrics")
    return float(found.group(1))


def failover(name: str, storer_dies: bool) -> Callable[[Bench], dict]:
    """Idle sockets on one node, some in ack mode with messages in flight;
    it is killed (``kill -9``): the storer, or the other node, and the
    clients reconnect to the one left."""
    return lambda bench: _failover(bench, name, storer_dies)


def _failover(bench: Bench, name: str, storer_dies: bool) -> dict:
    from redmessenger.membership import LEASE_TTL, TICK_EVERY

    sizes = bench.sizes
    n = sizes.failover_sockets
    acking = uids_of("a", sizes.failover_ack_users)
    idle = uids_of("f", n - len(acking))
    in_flight = sizes.failover_in_flight * len(acking)
    limit = deadline(n, least_rate=100)
    with Stage(bench, name) as stage:
        redis = stage.start_redis()
        storer, other = stage.start_nodes(2)
        a, b = (storer, other) if storer_dies else (other, storer)
        client = stage.start_worker("wsclient")
        for uids, ack in ((idle, False), (acking, True)):
            opened = client.call(
                {
                    "cmd": "open",
                    "port": a.port,
                    "uids": uids,
                    "ack": ack,
                    "withhold": True,
                    "concurrency": sizes.concurrency,
                    "timeout": limit,
                },
                "opened",
                limit + 5,
            )
            all_welcomed(opened, len(uids))
        # Messages the ack-mode sockets got and did not acknowledge: node-a
        # holds them in its claims when it dies.
        publisher = stage.start_publisher(
            {
                "port": stage.redis_port,
                "n": in_flight,
                "targets": [wire.user_channel(uid) for uid in acking],
                "payload_size": sizes.payload_size,
                "timeout": deadline(in_flight),
            }
        )
        publisher.send({"cmd": "go"})
        published = publisher.receive("published", deadline(in_flight) + 5)
        before = client.call(
            {"cmd": "wait", "total": in_flight, "timeout": deadline(in_flight)},
            "waited",
            deadline(in_flight) + 5,
        )
        checks: list[str] = []
        check_published(checks, published)
        expected = dict(zip(acking, spread(in_flight, len(acking)), strict=True))
        check_clients(checks, before, expected)
        client.call({"cmd": "failover", "port": b.port, "jitter": sizes.failover_jitter},
                    "armed", 5)
        snap0 = stage.begin(b.process)
        t_kill = time.monotonic()
        stage.stop(a.process, sig=signal.SIGKILL)
        # The clients reconnect meanwhile.
        wait_until(lambda: set(stage.storers().values()) == {b.process.name},
                   f"{b.process.name} to store for every partition", START_TIMEOUT,
                   b.process.alive, interval=0.05)
        t_storer = time.monotonic()
        back = client.call({"cmd": "reconnected", "timeout": limit}, "reconnected", limit + 5)
        snap1 = stage.snapshot()
        stage.profile_stop()
        lease_gap = longest_renewal_gap(b.port)
        # Each in-flight message must come again, once: the dead node's
        # claims come back once its lease has expired, at the user's next
        # take. Given the lease and a tick (or until all are back), and 2 s
        # more to come; else those users connect once more (their next
        # connect).
        now = time.monotonic()
        window = max(t_kill + LEASE_TTL + TICK_EVERY, now) + 2.0 - now
        after = client.call(
            {"cmd": "wait", "total": 2 * in_flight, "timeout": max(window, 0.0),
             "settle": bench.settle},
            "waited",
            max(window, 0.0) + 5,
        )
        came = sum(after["per_user"].get(uid, (0, 0))[0] for uid in acking) - in_flight
        came_after = after["t_target"] - t_kill if after["reached"] else None
        if not after["reached"]:
            rejoined = client.call({"cmd": "rejoin", "uids": acking, "timeout": START_TIMEOUT},
                                   "rejoined", START_TIMEOUT + 5)
            if not rejoined["ok"]:
                checks.append(f"the ack-mode users could not connect again: {rejoined['error']}")
            after = client.call(
                {"cmd": "wait", "total": 2 * in_flight, "timeout": START_TIMEOUT,
                 "settle": bench.settle},
                "waited",
                START_TIMEOUT + 5,
            )
        again = sum(after["per_user"].get(uid, (0, 0))[0] for uid in acking) - in_flight
        check_clients(checks, after, {uid: (2 * count, 2 * seqsum)
                                      for uid, (count, seqsum) in expected.items()})
        if back["reconnected"] < n:
            checks.append(f"{n - back['reconnected']} sockets did not reconnect in time "
                          f"({back['retries']} failed attempts: {back['errors'][:3]})")
        client.call({"cmd": "close"}, "closed", 30)
        stage.stop(b.process)
        left = leftovers(redis, acking)
        if left:
            checks.append(f"{left} messages left in Redis though every one was acked")
        check_rm_log(checks, stage)
        return result(
            name,
            sent=n,
            received=back["reconnected"],
            checks=checks,
            seconds=back["t_last_welcome"] - t_kill,
            count=back["reconnected"],
            unit="reconn/s",
            snap0=snap0,
            snap1=snap1,
            subject=b.process.name,
            jitter=sizes.failover_jitter,
            retries=back["retries"],
            in_flight=in_flight,
            ack_users=len(acking),
            came_connected=came,
            came_after=came_after,
            came_on_next_connect=again - came,
            lost=max(0, in_flight - again),
            storer_dies=storer_dies,
            storer_after=t_storer - t_kill if storer_dies else None,
            lease_gap=lease_gap,
        )


SCENARIOS = [
    Scenario(
        "raw-recv",
        "baseline",
        "hiredis subscriber (txredisapi) counting PUBLISHes, no RedMessenger",
        raw_recv,
    ),
    Scenario(
        "raw-send-1",
        "baseline",
        "bare Autobahn server sending message-sized frames to 1 client, no Redis",
        raw_send(1),
    ),
    Scenario(
        "raw-send-100",
        "baseline",
        "bare Autobahn server sending message-sized frames round-robin to 100 clients, no Redis",
        raw_send(100),
    ),
    Scenario(
        "raw-connect",
        "baseline",
        "bare Autobahn server welcoming connects+hellos, no Redis",
        raw_connect,
    ),
    Scenario(
        "live-1",
        "scenario",
        "1 online user, direct messages published as fast as possible",
        live(1),
        ("raw-recv", "raw-send-1"),
    ),
    Scenario(
        "live-100",
        "scenario",
        "100 online users, direct messages round-robin",
        live(100),
        ("raw-recv", "raw-send-100"),
    ),
    Scenario(
        "cluster-live",
        "scenario",
        "live-100 on 2 nodes, the users split between them: both nodes' CPU",
        live(100, name="cluster-live", layout=Layout(2, serving=(0, 1), measured=(0, 1))),
        ("live-100",),
    ),
    Scenario(
        "cluster-foreign",
        "scenario",
        "live-100 on node-a (the storer): the CPU of node-b, which has no users",
        live(100, name="cluster-foreign", layout=Layout(2, serving=(0,), measured=(1,))),
        ("live-100",),
    ),
    Scenario(
        "cluster-storer",
        "scenario",
        "live-100 on node-b: the CPU of node-a, the storer, which has no users",
        live(100, name="cluster-storer", layout=Layout(2, serving=(1,), measured=(0,))),
        ("live-100",),
    ),
    Scenario(
        "live-1-ack",
        "scenario",
        "live-1 in ack mode (one cumulative ack per read)",
        live(1, ack=True),
        ("live-1",),
    ),
    Scenario(
        "live-1-events",
        "scenario",
        "live-1-ack over Server-Sent Events: one POST /events/ack per read",
        live(1, ack=True, name="live-1-events", clients="eventsclient"),
        ("live-1-ack",),
    ),
    Scenario(
        "live-1-ack-replica",
        "scenario",
        "live-1-ack with --redis-replicas-ack 1: claims and acks wait for a replica",
        live(1, ack=True, name="live-1-ack-replica", replicas=1),
        ("live-1-ack",),
    ),
    Scenario(
        "group",
        "scenario",
        "one group of 1,000 members, half online: live deliveries and stores",
        group,
    ),
    Scenario("store", "scenario", "messages for 100 offline users, stored in Redis",
             store("store")),
    Scenario(
        "store-replica",
        "scenario",
        "store with --redis-replicas-ack 1: each store waits for a replica",
        store("store-replica", replicas=1),
        ("store",),
    ),
    Scenario(
        "drain",
        "scenario",
        "stored messages drained to a user who connects (hello to last message)",
        drain("drain"),
        ("raw-send-1",),
    ),
    Scenario(
        "drain-ack", "scenario", "drain in ack mode", drain("drain-ack", ack=True), ("drain",)
    ),
    Scenario(
        "drain-1m",
        "scenario",
        "drain of a 1,000,000-message queue: peak memory",
        drain("drain-1m", big=True),
        ("drain",),
    ),
    Scenario(
        "latency", "scenario", "a steady rate to 100 online users: PUBLISH to receipt",
        latency("latency"),
    ),
    Scenario(
        "latency-ack", "scenario",
        "latency in ack mode (each message held in Redis first), at a tenth of the rate",
        latency("latency-ack", ack=True, load=0.1),
    ),
    Scenario(
        "latency-ack-replica",
        "scenario",
        "latency-ack with --redis-replicas-ack 1: each hold waits for a replica",
        latency("latency-ack-replica", ack=True, replicas=1, load=0.1),
        ("latency-ack",),
    ),
    Scenario(
        "connections",
        "scenario",
        "idle identified WebSocket connections: memory and connects+hellos per second",
        connections,
        ("raw-connect",),
    ),
    Scenario(
        "failover",
        "scenario",
        "idle sockets on the storer, killed with kill -9, reconnecting to the other node",
        failover("failover", storer_dies=True),
    ),
    Scenario(
        "failover-user-node",
        "scenario",
        "failover of a node that does not store: the storer stays",
        failover("failover-user-node", storer_dies=False),
    ),
]


BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}


def with_needs(names: list[str]) -> list[str]:
    """The scenarios asked for plus those their ratios need, in suite order."""
    wanted: set[str] = set()

    def add(name: str) -> None:
        if name not in wanted:
            wanted.add(name)
            for need in BY_NAME[name].needs:
                add(need)

    for name in names:
        add(name)
    return [scenario.name for scenario in SCENARIOS if scenario.name in wanted]
