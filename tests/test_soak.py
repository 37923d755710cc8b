"""The soak test: about a thousand clients connect, vanish and come back at
random (one in ten reading Server-Sent Events, as a browser's EventSource
does, the rest WebSockets) while direct and group messages flow in through
the inbox; Redis is
restarted once, then refuses every write for 2 s (out of memory), and the
RedMessenger process is killed (``kill -9``) and started again once. Then
every user connects a last time and drains. It runs with one RedMessenger,
and with three nodes on one Redis, each client session going to a node
picked at random; the node killed then is the one that stored for everyone
and read the inbox.

The three nodes' Redis is a master with a replica behind three Sentinels
(tests/sentinels.py), and its fault is a failover (the master killed with
SIGKILL, then started again, to become the new master's replica) in place
of the restart. The nodes run with ``--redis-replicas-ack 1`` and the
publisher waits for the replica (``WAIT``) too, as an application that
must not lose an entry to a failover would.

Bounded for CI; larger by hand, for instance::

    .venv/bin/python -m pytest tests/test_soak.py -s --soak-clients 3000 --soak-seconds 600

What must hold at the end, counting every message by its ``id``:

- ack mode: every recipient has every message, exactly once after dropping
  repeated ids;
- plain mode: the same, except for messages the server had handed to a
  connection that then ended abruptly (a client's TCP reset, or the killed
  process), which plain mode does not promise. Such a message is excused
  only if it was sent before that connection ended and comes after the last
  message that connection received: a hole anywhere else is a loss;
- per connection, messages received for the first time arrive in the
  order they were sent;
- no queue holds a message its client had acknowledged on a connection that
  closed cleanly (so the server surely read the ack), unless it is a copy
  made by a fault (a store sent again after the Redis restart, inbox entries
  the killed process had read and not acknowledged);
- nothing is left behind: queues, drain claims and the inbox's pending
  entries are empty.

The publisher uses the inbox with explicit entry ids, so a retried XADD
cannot make a second message: a bare PUBLISH that reaches a process just
before it is killed, or while Redis restarts, is lost by design (see
docs/guarantees.rst).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websockets
from sentinels import Sentinels, TheMaster

from deployed import START_TIMEOUT, TwistdProcess, wait_for
from harness import aiotest, loop
from network import HOST, pick_free_port
from resp import RedisReplyError
from sse import EventStreamClient

INBOX = "rm:inbox"
#: Clients in ack mode: every other user.
ACK_EVERY = 2
#: Of those, one in five reads Server-Sent Events (always in ack mode) as a
#: browser's EventSource does: each session resumes with Last-Event-ID.
EVENTS_EVERY = 10
#: How long a session and a pause between sessions last, on average (s).
MEAN_SESSION = 4.0
MEAN_PAUSE = 1.0
#: Share of messages sent to a group, and how many members a group has.
GROUP_SHARE = 0.25
GROUP_SIZE = 20
#: How long the last drains and the checks may take.
SETTLE_TIMEOUT = 120.0


@dataclass
class Plan:
    clients: int
    seconds: float
    rate: float
    seed: int

    @property
    def groups(self) -> int:
        return max(1, self.clients // 20)


@dataclass
class Connection:
    """One session of one user (a WebSocket, or an event stream), as its
    client saw it."""

    uid: str
    ack: bool
    opened: float
    #: (message number, whether it came from the stored queue), in order.
    received: list[tuple[int, bool]] = field(default_factory=list)
    #: Messages acknowledged in acks written so far.
    acks_written: list[int] = field(default_factory=list)
    #: Those acknowledged before a clean close began: the server read them.
    acked_for_sure: set[int] = field(default_factory=set)
    ended: float = 0.0
    #: How it ended: "close" (handshake), "abort" (the client reset it),
    #: "server" (the server closed it, or was killed).
    how: str = ""
    abrupt: bool = False


@dataclass
class Ledger:
    """What the publisher sent."""

    #: message number -> (monotonic time its XADD was sent, recipients)
    sent: dict[int, tuple[float, tuple[str, ...]]] = field(default_factory=dict)

    def expected(self) -> dict[str, list[int]]:
        per_user: dict[str, list[int]] = defaultdict(list)
        for number in sorted(self.sent):
            for uid in self.sent[number][1]:
                per_user[uid].append(number)
        return per_user


def number_of(frame: dict) -> int:
    """Message ids are ``inbox-0-<n>``: the publisher chose the entry ids."""
    return int(frame["id"].rsplit("-", 1)[1])


# --------------------------------------------------------------------------
# The publisher: a thread, XADDs with explicit ids, retried until Redis
# has taken them.
# --------------------------------------------------------------------------


def publish(redis, plan: Plan, members: dict[str, tuple[str, ...]], ledger: Ledger,
            stop: threading.Event, replicas: int) -> None:
    rng = random.Random(plan.seed)
    users = [f"user{i}" for i in range(plan.clients)]
    number, tick = 0, 0.05
    while not stop.is_set():
        batch = []
        for _ in range(max(1, round(plan.rate * tick))):
            number += 1
            if rng.random() < GROUP_SHARE:
                gid = f"g{rng.randrange(plan.groups)}"
                batch.append((number, f"groups.{gid}", members[gid]))
            else:
                uid = rng.choice(users)
                batch.append((number, f"users.{uid}", (uid,)))
        sent_at = time.monotonic()
        _xadd_until_taken(redis, batch, replicas)
        for n, _, recipients in batch:
            ledger.sent[n] = (sent_at, recipients)
        stop.wait(tick)


def _xadd_until_taken(redis, batch, replicas: int) -> None:
    """With ``replicas``, taken means that many replicas have it too."""
    commands = [("XADD", INBOX, f"0-{n}", "to", to, "payload", str(n)) for n, to, _ in batch]
    if replicas:
        commands.append(("WAIT", replicas, 1000))
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            replies = redis.client().pipeline(commands)
        except OSError:
            replies = None  # Redis is restarting, or failing over
        if replies is not None:
            errors = [r for r in replies if isinstance(r, RedisReplyError)
                      and "equal or smaller" not in str(r)]  # taken by an earlier try
            if not errors and (not replicas or replies[-1] >= replicas):
                return
            if not all(str(e).startswith(("LOADING", "OOM")) for e in errors):
                raise errors[0]
        if time.monotonic() > deadline:
            raise AssertionError("Redis did not take the publisher's entries in time")
        time.sleep(0.05)


# --------------------------------------------------------------------------
# The clients
# --------------------------------------------------------------------------


class Swarm:
    """The clients, each session on a node picked at random."""

    def __init__(self, urls: list[str], plan: Plan, streaming: set[str] = frozenset()) -> None:
        self.urls = urls
        self.rng = random.Random(plan.seed + 1)
        self.connections: list[Connection] = []
        self.stopping = asyncio.Event()
        self.refused = Counter()
        #: Users who read event streams, and the last event id each got.
        self.streaming = streaming
        self.last_event_id: dict[str, str] = {}

    async def user(self, uid: str, ack: bool) -> None:
        """Sessions until told to stop, the last one closed cleanly."""
        while not self.stopping.is_set():
            await self.session(uid, ack, self.rng.expovariate(1 / MEAN_SESSION))
            pause = self.rng.expovariate(1 / MEAN_PAUSE)
            try:
                await asyncio.wait_for(self.stopping.wait(), pause)
            except asyncio.TimeoutError:
                pass

    async def session(self, uid: str, ack: bool, seconds: float | None) -> Connection | None:
        """One connection: hello, read (and ack) for ``seconds`` or until
        told to stop (``None``: until the welcome's stored messages are all
        in), then end it (cleanly, or with a reset)."""
        if uid in self.streaming:
            return await self.event_session(uid, seconds)
        try:
            ws = await websockets.connect(self.rng.choice(self.urls), max_size=None,
                                          max_queue=None,
                                          ping_interval=None, open_timeout=10,
                                          close_timeout=10)
        except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as e:
            self.refused[type(e).__name__] += 1
            return None
        opened = time.monotonic()
        try:
            await ws.send(json.dumps({"id": uid, "ack": ack}))
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 30))
        except (websockets.ConnectionClosed, asyncio.TimeoutError) as e:
            self.refused[type(e).__name__] += 1
            ws.transport.abort()
            # The server may have taken the hello and handed this connection
            # frames it never read (a kill, say): it ended abruptly.
            self.connections.append(Connection(uid, ack, opened, ended=time.monotonic(),
                                               how="before its welcome", abrupt=True))
            return None
        if welcome["type"] != "welcome":  # e.g. 1013 while Redis restarts
            self.refused[welcome.get("code", "?")] += 1
            await ws.close()
            return None
        connection = Connection(uid, ack, time.monotonic())
        self.connections.append(connection)
        # A third of ack sessions stop acknowledging at some point, as a
        # client that hangs would.
        sloppy_after = (self.rng.randrange(20) if ack and seconds is not None
                        and self.rng.random() < 0.33 else None)
        drained = asyncio.Event()
        if welcome["queued"] == 0:
            drained.set()
        reader = asyncio.ensure_future(self.read(ws, connection, sloppy_after,
                                                 welcome["queued"], drained))
        waits = [reader, asyncio.ensure_future(
            drained.wait() if seconds is None else self.stopping.wait())]
        await asyncio.wait(waits, timeout=SETTLE_TIMEOUT if seconds is None else seconds,
                           return_when=asyncio.FIRST_COMPLETED)
        waits[1].cancel()
        acks_before_close: set[int] = set()
        if reader.done():
            connection.how = "server"
        elif seconds is not None and not self.stopping.is_set() and \
                self.rng.random() < (0.7 if ack else 0.5):
            connection.how, connection.abrupt = "abort", True
            ws.transport.abort()
        else:
            connection.how = "close"
            # Acks written so far go out before the close frame.
            acks_before_close = set(connection.acks_written)
            await ws.close()
        await reader
        connection.ended = time.monotonic()
        if connection.how != "abort":
            connection.abrupt = ended_abruptly(ws)
        if connection.how == "close" and not connection.abrupt:
            connection.acked_for_sure = acks_before_close  # the server answered the close
        return connection

    async def read(self, ws, connection: Connection, sloppy_after: int | None,
                   queued: int, drained: asyncio.Event) -> None:
        acking = connection.ack
        try:
            async for raw in ws:
                frame = json.loads(raw)
                assert frame["type"] == "message", frame
                connection.received.append((number_of(frame), frame["queued"]))
                if sloppy_after is not None and len(connection.received) > sloppy_after:
                    acking = False
                if acking:
                    # Acks are cumulative: this one covers all received so far.
                    await ws.send(json.dumps({"type": "ack", "tag": frame["tag"]}))
                    connection.acks_written.extend(
                        n for n, _ in connection.received[len(connection.acks_written):])
                if len(connection.received) >= queued:
                    drained.set()
        except websockets.ConnectionClosed:
            pass


    async def event_session(self, uid: str, seconds: float | None) -> Connection | None:
        """A session as a browser's EventSource has one: it resumes from the
        last event it got (Last-Event-ID), which acknowledges everything up
        to it, and never acknowledges otherwise, but for the last session,
        which ends with ``POST /events/ack`` so that nothing stays queued."""
        port = int(self.rng.choice(self.urls).rsplit(":", 1)[1].rstrip("/"))
        last = self.last_event_id.get(uid)
        try:
            client = await asyncio.wait_for(EventStreamClient.open(
                port, f"/events?id={uid}", {"Last-Event-ID": last} if last else None), 10)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            self.refused[type(e).__name__] += 1
            return None
        if client.status != 200:
            self.refused[f"HTTP {client.status}"] += 1
            client.abort()
            return None
        opened = time.monotonic()
        try:
            welcome = await client.event(30)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, AssertionError) as e:
            welcome = None
            self.refused[type(e).__name__] += 1
        if welcome is None or welcome.type != "welcome":
            client.abort()
            self.connections.append(Connection(uid, True, opened, ended=time.monotonic(),
                                               how="before its welcome", abrupt=True))
            return None
        connection = Connection(uid, True, time.monotonic())
        self.connections.append(connection)
        queued = welcome.json()["queued"]
        drained = asyncio.Event()
        if queued == 0:
            drained.set()
        reader = asyncio.ensure_future(self.read_events(client, connection, queued, drained))
        waits = [reader, asyncio.ensure_future(
            drained.wait() if seconds is None else self.stopping.wait())]
        await asyncio.wait(waits, timeout=SETTLE_TIMEOUT if seconds is None else seconds,
                           return_when=asyncio.FIRST_COMPLETED)
        waits[1].cancel()
        if reader.done():
            connection.how = "server"
        elif seconds is not None and not self.stopping.is_set() and self.rng.random() < 0.7:
            connection.how, connection.abrupt = "abort", True
            client.abort()
        else:
            connection.how = "close"
            if seconds is None and connection.received:
                await self.acknowledge(port, uid)
            client.writer.close()
        await reader
        connection.ended = time.monotonic()
        if seconds is None and connection.how == "server":
            return None  # ended before it was acknowledged: the last drain goes again
        return connection

    async def read_events(self, client: EventStreamClient, connection: Connection,
                          queued: int, drained: asyncio.Event) -> None:
        try:
            while (event := await client.event(3600)) is not None:
                if event.type != "message":
                    continue  # an error event: the stream ends next
                connection.received.append((number_of(event.json()), event.json()["queued"]))
                self.last_event_id[connection.uid] = event.id
                if len(connection.received) >= queued:
                    drained.set()
        except (OSError, asyncio.IncompleteReadError, AssertionError):
            pass

    async def acknowledge(self, port: int, uid: str) -> None:
        body = json.dumps({"id": uid, "last": self.last_event_id[uid]}).encode()
        answer = await EventStreamClient.open(port, "/events/ack", method="POST", body=body)
        assert answer.status == 200, (answer.status, await answer.body())
        await answer.body()
        answer.abort()


def ended_abruptly(ws) -> bool:
    """Whether a connection ended without the server's close frame, whoever
    began to close it. A close the client began counts too: a server killed
    before it read the client's close frame takes with it what it had
    written and not yet flushed to the socket (plain messages lost with the
    connection, by design; see
    ``test_a_close_the_killed_server_never_answered_counts_as_abrupt``)."""
    return ws.protocol.close_rcvd is None


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


@pytest.fixture
def plan(request) -> Plan:
    option = request.config.getoption
    return Plan(clients=option("soak_clients"), seconds=option("soak_seconds"),
                rate=option("soak_rate"), seed=option("soak_seed"))


class Messenger:
    """The RedMessenger nodes under test, each a twistd on a port of its own
    that can be killed and started again on it."""

    def __init__(self, tmp_path: Path, redis, nodes: int, *options: str) -> None:
        self.tmp_path = tmp_path
        self.redis = redis
        self.options = options
        self.ports = [pick_free_port() for _ in range(nodes)]
        #: The process now running on each port.
        self.current: list[TwistdProcess | None] = [None] * nodes
        self.runs: list[TwistdProcess] = []
        self.stats: Counter = Counter()

    @property
    def urls(self) -> list[str]:
        return [f"ws://{HOST}:{port}/" for port in self.ports]

    def start(self, node: int | None = None) -> None:
        """Every node (the first one first: it stores for everyone, and
        reads the inbox), or one."""
        for index in range(len(self.ports)) if node is None else [node]:
            port = self.ports[index]
            twistd = TwistdProcess(
                ["-n", "--pidfile=", "redmessenger", "--port", f"tcp:{port}:interface={HOST}",
                 "--redis", self.redis.url, "--auth", "off", "--inbox", "--ack-window", "64",
                 *self.options],
                self.tmp_path, self.tmp_path / f"twistd-{index}-{len(self.runs)}.log")
            self.runs.append(twistd)
            self.current[index] = twistd
            twistd.wait_accepting(port)

    def kill(self, node: int = 0) -> None:
        """``kill -9``, after noting what it counted."""
        twistd = self.current[node]
        self.stats += self.scraped(self.ports[node])
        os.kill(twistd.pid, signal.SIGKILL)
        twistd.process.wait()

    def collect_stats(self) -> None:
        for port in self.ports:
            self.stats += self.scraped(port)

    @staticmethod
    def scraped(port: int) -> Counter:
        """``redmessenger_messages_<name>_total`` of the node on ``port``."""
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return Counter({name: int(float(re.search(
            rf"^redmessenger_messages_{name}_total (\S+)$", text, re.M).group(1)))
            for name in ("delivered_live", "stored", "drained", "recommitted", "acked")})

    def healthy(self, port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5):
                return True
        except OSError:  # HTTPError 503 included
            return False

    def all_healthy(self) -> bool:
        return all(self.healthy(port) for port in self.ports)

    def alive(self) -> None:
        for twistd in self.current:
            twistd.alive()

    def stop(self) -> None:
        for twistd in self.runs:
            twistd.__exit__()


async def in_thread(function, *args):
    return await loop().run_in_executor(None, function, *args)


@pytest.mark.parametrize("nodes", [1, 3], ids=["one-node", "three-nodes-sentinel"])
@aiotest(timeout=0)
async def test_soak(tmp_path: Path, request, plan: Plan, nodes: int) -> None:
    """With three nodes, the clients' sessions go to random nodes, the node
    killed is the one that stored for everyone and read the inbox, and
    Redis fails over to its replica in place of a restart."""
    if nodes == 1:
        await run_soak(tmp_path, plan, request.getfixturevalue("private_redis"), nodes)
    else:
        with Sentinels(tmp_path) as setup:
            await run_soak(tmp_path, plan, TheMaster(setup), nodes, setup)


async def run_soak(tmp_path: Path, plan: Plan, redis, nodes: int,
                   sentinels: Sentinels | None = None) -> None:
    rng = random.Random(plan.seed)
    users = {f"user{i}": i % ACK_EVERY == 0 for i in range(plan.clients)}
    members = {}
    for g in range(plan.groups):
        gid = f"g{g}"
        members[gid] = tuple(rng.sample(sorted(users), min(GROUP_SIZE, len(users))))
        # Lists and sets both work as member lists.
        redis.command("RPUSH" if g % 2 else "SADD", f"rm:groups:{gid}:members",
                              *members[gid])
    replicas = 1 if sentinels is not None else 0
    messenger = Messenger(tmp_path, redis, nodes,
                          *(("--redis-replicas-ack", str(replicas)) if replicas else ()))
    try:
        await in_thread(messenger.start)
        report = await asyncio.wait_for(
            soak(plan, redis, messenger, users, members, sentinels),
            plan.seconds + 2 * SETTLE_TIMEOUT)
    finally:
        await in_thread(messenger.stop)
    print(report)


async def soak(plan: Plan, redis, messenger: Messenger, users: dict[str, bool],
               members: dict[str, tuple[str, ...]], sentinels: Sentinels | None) -> str:
    ledger = Ledger()
    swarm = Swarm(messenger.urls, plan,
                  {uid for uid in users if int(uid[4:]) % EVENTS_EVERY == 0})
    stop_publishing = threading.Event()
    publisher = asyncio.ensure_future(
        in_thread(publish, redis, plan, members, ledger, stop_publishing,
                  0 if sentinels is None else 1))
    clients = [asyncio.ensure_future(swarm.user(uid, ack)) for uid, ack in users.items()]
    started = time.monotonic()
    faults: list[tuple[float, float]] = []

    async def fault_at(fraction: float, fault) -> None:
        await asyncio.sleep(max(0.0, started + plan.seconds * fraction - time.monotonic()))
        begun = time.monotonic()
        await in_thread(fault)
        faults.append((begun, time.monotonic()))

    def restart_redis() -> None:
        redis.stop()
        redis.start()
        wait_for(messenger.all_healthy, "RedMessenger to be back on Redis", START_TIMEOUT,
                 messenger.alive)

    def fail_over() -> None:
        """kill -9 of the master; once the replica is promoted, the old
        master starts again, and the Sentinels make it the new replica."""
        sentinels.kill_master()
        sentinels.bring_back(sentinels.master)
        wait_for(messenger.all_healthy, "RedMessenger to be on the new master", START_TIMEOUT,
                 messenger.alive)

    def kill_and_restart() -> None:
        messenger.kill(0)
        messenger.start(0)

    def out_of_memory_for_a_while() -> None:
        """Redis refuses every write for 2 s (``maxmemory`` far below what
        it holds, ``noeviction``): RedMessenger holds its writes, in order."""
        redis.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        redis.command("CONFIG", "SET", "maxmemory", 1)
        try:
            wait_for(lambda: not messenger.healthy(messenger.ports[0]),
                     "RedMessenger to see the refusals", START_TIMEOUT, messenger.alive)
            time.sleep(2.0)  # the spell itself, not a wait for an event
        finally:
            redis.command("CONFIG", "SET", "maxmemory", 0)
        wait_for(messenger.all_healthy, "RedMessenger to write again", START_TIMEOUT,
                 messenger.alive)

    await fault_at(0.3, restart_redis if sentinels is None else fail_over)
    await fault_at(0.45, out_of_memory_for_a_while)
    await fault_at(0.6, kill_and_restart)
    await asyncio.sleep(max(0.0, started + plan.seconds - time.monotonic()))

    # Stop sending; every client ends its session cleanly; the inbox is read
    # to its end; every connection's claims are given back.
    stop_publishing.set()
    await publisher
    swarm.stopping.set()
    await asyncio.gather(*clients)
    last = max(ledger.sent)
    await in_thread(wait_for, lambda: inbox_done(redis, last), "the inbox to be read",
                    SETTLE_TIMEOUT, messenger.alive)
    await in_thread(wait_for, lambda: not redis.command("KEYS", "rm:users:*:taking:*"),
                    "claims to be given back", SETTLE_TIMEOUT, messenger.alive)

    # No queue holds what a client acknowledged for sure, but for copies a
    # fault made.
    sent = ledger.sent
    acked_for_sure = defaultdict(set)
    for connection in swarm.connections:
        acked_for_sure[connection.uid] |= connection.acked_for_sure
    fault_copies = []
    for uid in users:
        queued = [number_of(json.loads(raw)) for raw in
                  redis.command("LRANGE", f"rm:users:{uid}:messages", 0, -1)]
        for number in set(queued) & acked_for_sure[uid]:
            assert near_a_fault(sent[number][0], faults), \
                f"{uid} acknowledged message {number} for sure, yet it is still queued"
            fault_copies.append(number)

    # The last drain: everyone connects once more and takes what is stored.
    final = asyncio.Semaphore(100)

    async def last_session(uid: str, ack: bool) -> None:
        async with final:
            for _ in range(20):
                if await swarm.session(uid, ack, None) is not None:
                    return
                await asyncio.sleep(0.1)
            raise AssertionError(f"{uid} could not connect for its last drain")

    await asyncio.gather(*(last_session(uid, ack) for uid, ack in users.items()))
    messenger.collect_stats()
    left = {key.decode(): redis.command("LRANGE", key, 0, -1)
            for key in redis.command("KEYS", "rm:users:*:messages")}
    assert not left, f"queues left: {left}"
    assert redis.command("KEYS", "rm:users:*:taking:*") == [], "claims left"
    assert redis.command("KEYS", "rm:users:*:claims") == [], "claim sets left"
    assert redis.command("XPENDING", INBOX, "redmessenger")[0] == 0, "inbox entries pending"
    return judge(plan, users, ledger, swarm, messenger, faults, fault_copies,
                 "Redis restart" if sentinels is None else "Sentinel failover")


def inbox_done(redis, last: int) -> bool:
    [group] = redis.command("XINFO", "GROUPS", INBOX, decode=True)
    info = dict(zip(group[::2], group[1::2], strict=True))
    return info["last-delivered-id"] == f"0-{last}" and info["pending"] == 0


def near_a_fault(when: float, faults: list[tuple[float, float]], margin: float = 10.0) -> bool:
    return any(begun - margin <= when <= ended for begun, ended in faults)


def judge(plan: Plan, users: dict[str, bool], ledger: Ledger, swarm: Swarm,
          messenger: Messenger, faults, fault_copies, redis_fault: str) -> str:
    """Check every message of every user; the counts, as a report."""
    expected = ledger.expected()
    by_user: dict[str, list[Connection]] = defaultdict(list)
    for connection in swarm.connections:
        by_user[connection.uid].append(connection)
    counts = Counter()
    problems = []
    for uid, ack in users.items():
        seen: set[int] = set()
        for connection in by_user[uid]:
            newest = 0
            for number, queued in connection.received:
                if number in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(number)
                counts["drained" if queued else "delivered live"] += 1
                if number < newest:
                    problems.append(f"{uid}: message {number} came after {newest} on one "
                                    "connection")
                newest = number
        for number in expected[uid]:
            if number in seen:
                continue
            if not ack and excused(number, ledger.sent[number][0], by_user[uid]):
                counts["lost at an abrupt end (plain, by design)"] += 1
            else:
                problems.append(f"{uid} ({'ack' if ack else 'plain'}) never got message "
                                f"{number}, sent at {ledger.sent[number][0]:.3f}; "
                                f"{context(ledger.sent[number][0], by_user[uid])}")
        counts["unexpected"] += len(seen - set(expected[uid]))
    ends = Counter(f"{c.how}{' (abrupt)' if c.abrupt and c.how == 'server' else ''}"
                   for c in swarm.connections)
    report = "\n".join([
        f"soak: {plan.clients} clients ({sum(users.values())} in ack mode, "
        f"{len(swarm.streaming)} of them reading event streams) on "
        f"{len(messenger.ports)} nodes, "
        f"{plan.seconds:g} s, {plan.rate:g} messages/s, seed {plan.seed}",
        f"  sent: {len(ledger.sent)} messages, {sum(map(len, expected.values()))} deliveries "
        f"due ({sum(1 for _, r in ledger.sent.values() if len(r) > 1)} to groups)",
        f"  connections: {len(swarm.connections)}; ended by {dict(ends)}; refused or "
        f"failed {dict(swarm.refused)}",
        f"  server counted: {dict(messenger.stats)}",
        f"  received: {counts['delivered live']} live, {counts['drained']} drained, "
        f"{counts['duplicates']} duplicates (redelivered, same id)",
        f"  acked yet queued, copies made by a fault: {len(fault_copies)}",
        f"  lost at an abrupt end (plain, by design): "
        f"{counts['lost at an abrupt end (plain, by design)']}",
        f"  lost: {len([p for p in problems if 'never got' in p])}",
        f"  faults: {redis_fault}, Redis out of memory and kill -9, taking "
        f"{[round(e - b, 2) for b, e in faults]} s",
    ])
    assert not problems and not counts["unexpected"], \
        report + "\n" + "\n".join(problems[:30])
    return report


def context(when: float, connections: list[Connection]) -> str:
    """The user's connections around ``when``, for a report that can be
    read without running the soak again."""
    near = [c for c in connections if c.opened - 5 < when < c.ended + 5]
    return "; ".join(f"connection {c.opened:.3f}-{c.ended:.3f} ended by {c.how} "
                     f"({'abrupt' if c.abrupt else 'clean'}), last got "
                     f"{[n for n, _ in c.received][-5:]}" for c in near) or "no connection"


def excused(number: int, sent_at: float, connections: list[Connection]) -> bool:
    """A plain message may be lost if it was sent while a connection was
    open that then ended abruptly, and comes after all that connection got."""
    return any(c.abrupt and sent_at < c.ended
               and all(n < number for n, _ in c.received) for c in connections)


@aiotest
async def test_a_close_the_killed_server_never_answered_counts_as_abrupt(tmp_path: Path,
                                                                        redis) -> None:
    """A plain client begins a clean close just as the server is killed,
    before it has read the close frame: what the server had written but
    not yet flushed to the socket dies with it, so for the soak's judge
    this connection ended abruptly, like any other one the kill cut. (The
    soak once failed about 1 run in 20 with plain messages "never got"
    around the kill: such a connection was judged as closed cleanly.)"""
    messenger = Messenger(tmp_path, redis, 1)
    try:
        await in_thread(messenger.start)
        await in_thread(wait_for, messenger.all_healthy, "RedMessenger to be on Redis",
                        START_TIMEOUT)
        ws = await websockets.connect(messenger.urls[0], max_size=None, max_queue=None,
                                      ping_interval=None, close_timeout=10)
        await ws.send(json.dumps({"id": "user1"}))
        assert json.loads(await ws.recv())["type"] == "welcome"
        redis.command("PUBLISH", "rm.users.user1", "0")
        await in_thread(wait_for, lambda: messenger.scraped(
            messenger.ports[0])["delivered_live"] == 1, "the message to be written",
            START_TIMEOUT)
        server = messenger.current[0]
        os.kill(server.pid, signal.SIGSTOP)  # it cannot read the close frame
        closing = asyncio.ensure_future(ws.close())
        while ws.protocol.close_sent is None or ws.transport.get_write_buffer_size():
            await asyncio.sleep(0.01)  # until the close frame is written
        os.kill(server.pid, signal.SIGKILL)
        await in_thread(server.process.wait)
        received = []
        try:
            async for raw in ws:
                received.append(json.loads(raw)["payload"])
        except websockets.ConnectionClosedError:
            pass
        await closing
        assert received == ["0"]  # what reached the client's kernel is read
        assert ended_abruptly(ws)
    finally:
        await in_thread(messenger.stop)
