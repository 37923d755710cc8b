"""The ``redmessenger`` command: publish, look at queues, manage groups and
keys in the Redis a RedMessenger uses, list the running ones (the nodes
that share it), ask one how it is, and listen as a user (``listen.py``).

``send`` never loses a message: if nobody (so no RedMessenger) is subscribed
to the channel, it stores the message in the recipients' queues itself, in
the envelope RedMessenger uses, so that a RedMessenger started later drains
it to them. Everything else is a thin, careful wrapper around a few Redis
commands on the keys of docs/protocol.rst.

Exit status: 0 done, 1 failed (Redis or RedMessenger unreachable, or an
error answer), 2 usage error. Each run uses the global reactor once, so
``main()`` is for ``python -m redmessenger.cli`` and the console script,
not for calling twice in one process.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import secrets
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from twisted.internet import defer

from . import datadir, environment, lua
from ._version import __version__
from .envelope import Envelope
from .keys import Namespace
from .publish import DURABLE_PUBLISH, check_id, durable_publish_arguments
from .settings import RedisAddress
from .tls import tls_error, trust_root

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_DATA_DIR = "redmessenger-data"
#: Where an embedded redis-server may listen: the only hosts whose URL gets
#: its password from the data directory.
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
#: Shown for a queue entry that is not one of RedMessenger's envelopes.
RAW = "(raw entry)"
#: At most this many characters of a dead letter's payload are shown.
SHOWN_PAYLOAD = 200


class CommandFailed(Exception):
    """Something went wrong that is not the user's typing: exit 1."""


# -- Redis, one command at a time ------------------------------------------------


class Redis:
    """One Redis connection for one command line; errors become messages
    that name the server."""

    def __init__(self, proto: Any, address: RedisAddress, reactor: Any,
                 timeout: float) -> None:
        self._proto = proto
        self.address = address
        self._reactor = reactor
        self._timeout = timeout

    async def __call__(self, *args: bytes | str | int) -> Any:
        from .redisconnection import txredisapi

        d = self._proto.execute_command(*args).addTimeout(self._timeout, self._reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise CommandFailed(f"Redis at {self.address} did not answer "
                                f"{_text(args[0])} within {self._timeout:g} s") from None
        except txredisapi().ResponseError as e:
            raise CommandFailed(f"Redis at {self.address} refused {_text(args[0])}: "
                                f"{e}") from None
        except txredisapi().ConnectionError as e:
            raise CommandFailed(f"lost the connection to Redis at {self.address}: "
                                f"{e}") from None

    def close(self) -> None:
        self._proto.transport.loseConnection()


async def connect_redis(reactor: Any, address: RedisAddress, timeout: float) -> Redis:
    """Connect, authenticate and select the database, or fail with a message
    that names the URL."""
    from twisted.internet.error import ConnectError

    from .redisconnection import ProtocolFactory, endpoint

    class Factory(ProtocolFactory):
        refusal: str | None = None

        def connectionError(self, why: str) -> None:  # AUTH or SELECT refused
            self.refusal = why

    factory = Factory(address)
    try:
        proto = await endpoint(reactor, address, timeout).connect(factory).addTimeout(
            timeout, reactor)
    except (ConnectError, OSError, defer.TimeoutError) as e:
        raise CommandFailed(f"cannot reach Redis at {address}: {_why(e)}") from None
    ready = defer.DeferredList([proto.whenConnected(), proto.whenDisconnected()],
                               fireOnOneCallback=True, consumeErrors=True)
    try:
        _, which = await ready.addTimeout(timeout, reactor)
    except defer.TimeoutError:
        proto.transport.abortConnection()
        raise CommandFailed(f"Redis at {address} did not let us in within "
                            f"{timeout:g} s") from None
    if which == 1:
        raise CommandFailed(f"Redis at {address} refused the connection: "
                            f"{factory.refusal or 'it closed it'}")
    return Redis(proto, address, reactor, timeout)


GROUP_MEMBERS = lua.source("group_members", "members")


async def group_members(redis: Redis, ns: Namespace, gid: str) -> tuple[str, list[str]]:
    """The key's type and the members, each once, in the list's order (a
    set's, sorted)."""
    kind, members = await redis(b"EVAL", GROUP_MEMBERS, 1, ns.members(gid))
    kind = _text(kind)
    if kind == "set":
        members = sorted(members)
    return kind, list(dict.fromkeys(_text(m) for m in members))


# -- the commands ----------------------------------------------------------------


async def cmd_send(redis: Redis, ns: Namespace, args: argparse.Namespace,
                   out: TextIO) -> int:
    payload = sys.stdin.buffer.read() if args.payload == "-" else os.fsencode(args.payload)
    # One atomic script: store it as RedMessenger would have, and wake the
    # nodes of those online (as the application's durable_publish() does).
    envelope, script_args = durable_publish_arguments(
        payload, user=args.user, group=args.group, prefix=ns.prefix,
        queue_ttl=args.queue_ttl, queue_max=args.queue_max)
    woken, queues, cuts = await redis(b"EVAL", DURABLE_PUBLISH, 1, *script_args)
    if not queues:
        print(f"Group {args.group} has no members ({ns.members(args.group)}): the message "
              f"reached nobody.", file=out)
        return 0
    keys = [_text(queue) for queue in queues]
    print(f"Sent {_count(len(payload), 'byte')} to {envelope.source} as message "
          f"{envelope.id}: stored for {_count(len(keys), 'user')}, "
          + ("and the RedMessenger nodes of those connected woken to deliver it now."
             if woken else "to be delivered when they connect."), file=out)
    for key, cut in zip(keys, cuts, strict=True):
        if cut:
            print(f"{key} was over --queue-max {args.queue_max}: dropped its {cut} "
                  "oldest messages", file=out)
    return 0


async def cmd_queue(redis: Redis, ns: Namespace, args: argparse.Namespace,
                    out: TextIO) -> int:
    key = ns.queue(args.user)
    length = await redis(b"LLEN", key)
    entries = await redis(b"LRANGE", key, 0, args.count - 1) if args.count else []
    source = ns.user_channel(args.user)
    decoded = [Envelope.from_stored(bytes(raw), source, lambda: RAW, 0) for raw in entries]
    if args.json:
        for envelope in decoded:
            doc = json.loads(envelope.stored())
            doc["raw"] = envelope.id == RAW
            if doc["raw"]:
                del doc["id"], doc["timestamp"]
            print(json.dumps(doc, ensure_ascii=False), file=out)
        return 0
    shown = f"; the oldest {len(decoded)}:" if decoded and len(decoded) < length else ":"
    print(f"{key}: {_count(length, 'message')}"
          f"{shown if decoded else ''}", file=out)
    for number, envelope in enumerate(decoded, 1):
        if envelope.id == RAW:
            when, ident = "-", RAW
        else:
            when = datetime.fromtimestamp(envelope.timestamp / 1000, timezone.utc)
            when, ident = when.isoformat(timespec="milliseconds"), envelope.id
        print(f"{number:>4}  {ident}  {when}  {envelope.source}  "
              f"{_show_payload(envelope.payload)}", file=out)
    return 0


async def cmd_group(redis: Redis, ns: Namespace, args: argparse.Namespace,
                    out: TextIO) -> int:
    key = ns.members(args.group)
    kind, members = await group_members(redis, ns, args.group)
    if args.action == "list":
        for member in members:
            print(member, file=out)
        if not members:
            print(f"Group {args.group} has no members ({key}).", file=sys.stderr)
        return 0
    users = list(dict.fromkeys(args.users))
    if args.action == "add":
        new = [u for u in users if u not in members]
        if kind == "list":  # keep it a list, in its order, without repeats
            if new:
                await redis(b"RPUSH", key, *new)
        else:  # a set, created if the group did not exist
            await redis(b"SADD", key, *users)
            kind = "set"
        print(f"Added {_count(len(new), 'member')} to group "
              f"{args.group} ({key}, a {kind}); it has {len(members) + len(new)}.", file=out)
        return 0
    gone = [u for u in users if u in members]
    for user in gone:
        await redis(b"LREM" if kind == "list" else b"SREM", key,
                    *((0, user) if kind == "list" else (user,)))
    print(f"Removed {_count(len(gone), 'member')} from group "
          f"{args.group} ({key}); it has {len(members) - len(gone)}.", file=out)
    return 0


async def cmd_token(redis: Redis, ns: Namespace, args: argparse.Namespace,
                    out: TextIO) -> int:
    key = ns.token(args.user)
    if args.action == "show":
        token = await redis(b"GET", key)
        if token is None:
            raise CommandFailed(f"user {args.user} has no key ({key} does not exist)")
        out.flush()
        sys.stdout.buffer.write(bytes(token) + b"\n")
        sys.stdout.buffer.flush()
        return 0
    generated = args.token is None
    if generated:
        token = secrets.token_urlsafe(32)
    elif args.token == "-":
        token = sys.stdin.readline().rstrip("\r\n")
    else:
        token = args.token
    if not token:
        raise CommandFailed("the key is empty")
    await redis(b"SET", key, token)
    print(f"Stored the key of user {args.user} in {key}.", file=sys.stderr)
    if generated:
        print(token, file=out)
    return 0


DEAD_RETRY = lua.source("dead_retry", "push")


class DeadLetter:
    """One entry of ``<prefix>:dead``: the envelope Redis refused (in the
    entry, or in ``parts``, a list, when it is big), the key it was for,
    Redis's error and when (``time``, seconds since the epoch)."""

    def __init__(self, raw: bytes, ns: Namespace) -> None:
        self.raw = raw
        try:
            doc = json.loads(raw)
            self.key, self.error, self.time = str(doc["key"]), str(doc["error"]), doc["time"]
            self.parts = str(doc["parts"]) if "parts" in doc else ns.dead_parts("")
            self.envelope = b"" if "parts" in doc else doc["envelope"].encode()
            self._in_parts = "parts" in doc
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CommandFailed(f"a dead letter is not RedMessenger's: {raw[:200]!r}") from None
        self.id, self.payload = RAW, b""

    async def load(self, redis: Redis) -> DeadLetter:
        if self._in_parts:
            self.envelope = b"".join(bytes(p) for p in await redis(b"LRANGE", self.parts, 0, -1))
        decoded = Envelope.from_stored(self.envelope, "?", lambda: RAW, 0)
        self.id, self.payload = decoded.id, decoded.payload
        return self


async def dead_letters(redis: Redis, ns: Namespace) -> list[DeadLetter]:
    return [await DeadLetter(bytes(raw), ns).load(redis)
            for raw in await redis(b"LRANGE", ns.dead, 0, -1)]


async def cmd_dead(redis: Redis, ns: Namespace, args: argparse.Namespace,
                   out: TextIO) -> int:
    letters = await dead_letters(redis, ns)
    chosen = [d for d in letters if not args.ids or d.id in args.ids]
    if args.ids and (missing := set(args.ids) - {d.id for d in chosen}):
        raise CommandFailed(f"no dead letter with id {', '.join(sorted(missing))} in {ns.dead}")
    if args.action == "list":
        if args.json:
            for letter in chosen:
                print(_text(letter.raw), file=out)
            return 0
        dropped = int(await redis(b"GET", ns.dead_dropped) or 0)
        print(f"{ns.dead}: {_count(len(letters), 'dead letter')}"
              + (f" ({dropped} older ones dropped over --dead-max)" if dropped else "")
              + (":" if chosen else ""), file=out)
        for number, letter in enumerate(chosen, 1):
            when = datetime.fromtimestamp(letter.time, timezone.utc)
            shown = _show_payload(letter.payload)
            if len(shown) > SHOWN_PAYLOAD:
                shown = shown[:SHOWN_PAYLOAD] + f"... ({len(letter.payload)} bytes)"
            print(f"{number:>4}  {letter.id}  {when.isoformat(timespec='seconds')}  "
                  f"{letter.key}  {letter.error}\n      {shown}", file=out)
        return 0
    if args.action == "drop":
        if not args.ids and not args.all:
            raise CommandFailed("say which: dead drop ID... or dead drop --all")
        for letter in chosen:
            await redis(b"LREM", ns.dead, 1, letter.raw)
            await redis(b"DEL", letter.parts)
        print(f"Dropped {_count(len(chosen), 'dead letter')} from {ns.dead}.", file=out)
        return 0
    failed = 0
    for letter in chosen:
        try:
            await redis(b"EVAL", DEAD_RETRY, 3, ns.dead, letter.key, letter.parts, letter.raw,
                        letter.envelope, args.queue_ttl, args.queue_max)
        except CommandFailed as e:
            failed += 1
            print(f"{letter.id}: still refused: {e}", file=sys.stderr)
        else:
            print(f"{letter.id}: back in {letter.key}", file=out)
    print(f"Pushed {_count(len(chosen) - failed, 'dead letter')} back to their queues; "
          f"{failed} still refused.", file=out)
    return 1 if failed else 0


@dataclasses.dataclass
class NodeStatus:
    """A live node, as it last described itself in Redis (``None`` for what
    a node that started less than a second ago has not said yet)."""

    node: str
    host: str
    pid: int
    worker: int | None = None
    listening: str | None = None
    connections: int | None = None
    users_online: int | None = None
    version: str | None = None
    #: The storer partitions Redis says it holds.
    partitions: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ClusterStatus:
    """The live nodes of one prefix, and who stores for each partition."""

    nodes: list[NodeStatus]
    #: The cluster's storer partitions (0 if no node ever started).
    partitions: int
    #: Partitions with no live holder: plain PUBLISHes to their offline
    #: users are stored by nobody until a node takes them.
    unheld: list[int]
    #: Users with a socket anywhere, each once.
    users_online: int

    @property
    def connections(self) -> int:
        return sum(node.connections or 0 for node in self.nodes)


#: What a node says of itself beyond where it runs and what it holds.
_SAID = [f for f in dataclasses.fields(NodeStatus)
         if f.name not in ("node", "host", "pid", "partitions")]


async def read_cluster(redis: Redis, ns: Namespace) -> ClusterStatus:
    """Live nodes are those whose lease lives (a stopped node's description
    outlives its lease by up to the lease time; a killed node's both go
    within it). A handful of reads, not one snapshot: a node may come or go
    in between."""
    members = sorted(_text(n) for n in await redis(b"SMEMBERS", ns.nodes))
    leases = await redis(b"MGET", *map(ns.process, members)) if members else []
    infos = await redis(b"MGET", *map(ns.node_info, members)) if members else []
    count = int(await redis(b"GET", ns.partitions) or 0)
    holders = [_text(h) if h is not None else None for h in
               (await redis(b"MGET", *map(ns.storer, range(count))) if count else [])]
    live: dict[str, NodeStatus] = {}
    for node, lease, info in zip(members, leases, infos, strict=True):
        if lease is None:
            continue  # dead, not reaped yet
        host, _, pid = _text(lease).partition(" ")
        about = json.loads(info) if info is not None else {}
        live[node] = NodeStatus(node, about.get("host", host), about.get("pid", int(pid)),
                                **{f.name: about.get(f.name) for f in _SAID})
    for k, holder in enumerate(holders):
        if holder in live:
            live[holder].partitions.append(k)
    return ClusterStatus(
        sorted(live.values(), key=lambda n: (n.host, n.pid, n.node)), count,
        [k for k, holder in enumerate(holders) if holder not in live],
        int(await redis(b"SCARD", ns.present)))


def status_table(status: ClusterStatus) -> list[str]:
    """One line per node under a header, numbers right-aligned, each column
    as wide as its widest cell; then the totals, and a warning for
    partitions with no live holder."""
    rows = [["NODE", "HOST", "PID", "WORKER", "LISTENING", "SOCKETS", "USERS", "PARTITIONS",
             "VERSION"]]
    for n in status.nodes:
        rows.append([n.node, n.host, str(n.pid), _cell(n.worker), _cell(n.listening),
                     _cell(n.connections), _cell(n.users_online), _ranges(n.partitions),
                     _cell(n.version)])
    numeric = {2, 5, 6}
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) if i in numeric else cell.ljust(width)
                       for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    held = ("each held by a live node" if not status.unheld
            else f"{status.partitions - len(status.unheld)} held by a live node")
    lines.append(f"{_count(len(status.nodes), 'node')} live: "
                 f"{_count(status.connections, 'socket')}, "
                 f"{_count(status.users_online, 'user')} online; "
                 f"{_count(status.partitions, 'storer partition')}, {held}.")
    if status.unheld:
        lines.append(f"Warning: no live node holds storer partition(s) "
                     f"{_ranges(status.unheld)}: a plain PUBLISH to their users with no "
                     "socket is stored by nobody until a node takes them (live nodes look "
                     "for vacant ones every second).")
    return lines


async def cmd_status(redis: Redis, ns: Namespace, args: argparse.Namespace,
                     out: TextIO) -> int:
    status = await read_cluster(redis, ns)
    if args.json:
        doc = dataclasses.asdict(status)
        doc["connections"] = status.connections
        print(json.dumps(doc), file=out)
    elif status.nodes:
        for line in status_table(status):
            print(line, file=out)
    else:
        raise CommandFailed(f"no RedMessenger node is live on Redis at {redis.address} "
                            f"with prefix {ns.prefix}")
    return 0 if status.nodes else 1


async def cmd_health(reactor: Any, args: argparse.Namespace, out: TextIO) -> int:
    from twisted.internet.error import ConnectError
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, readBody

    url = args.url
    try:
        trust = trust_root(args.ca)
    except OSError as e:
        raise CommandFailed(f"--ca {args.ca}: {e.strerror}") from None
    except ValueError as e:
        raise CommandFailed(f"--ca: {e}") from None
    agent = Agent(reactor, connectTimeout=args.timeout,
                  contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust))
    try:
        response = await agent.request(b"GET", url.encode("ascii")).addTimeout(
            args.timeout, reactor)
        body = await readBody(response).addTimeout(args.timeout, reactor)
    except defer.TimeoutError:
        raise CommandFailed(f"{url} did not answer within {args.timeout:g} s") from None
    except (ConnectError, OSError) as e:
        raise CommandFailed(f"cannot reach RedMessenger at {url}: {_why(e)}") from None
    except Exception as e:  # ResponseFailed and friends: the HTTP exchange broke
        raise CommandFailed(f"{url}: {_exchange_failed(e, args.ca)}") from None
    healthy = response.code == 200
    if args.json:
        out.write(body.decode("utf-8", "replace").rstrip("\n") + "\n")
        return 0 if healthy else 1
    print(f"{url}: HTTP {response.code} {response.phrase.decode('ascii', 'replace')}",
          file=out)
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except ValueError:
        print(f"not a health report: {body[:500].decode('utf-8', 'replace')!r}", file=out)
        return 0 if healthy else 1
    redis_state = doc.get("redis") if isinstance(doc.get("redis"), dict) else {}
    links = [("connected" if redis_state.get("connected") else "not connected")
             if "connected" in redis_state else "connection unknown",
             ("subscribed" if redis_state.get("subscribed") else "not subscribed")
             if "subscribed" in redis_state else "subscription unknown"]
    print(f"status:       {doc.get('status', '?')}", file=out)
    print(f"node:         {doc.get('node', '?')}", file=out)
    print(f"version:      {doc.get('version', '?')}", file=out)
    print(f"redis:        {', '.join(links)}", file=out)
    print(f"connections:  {doc.get('connections', '?')}", file=out)
    print(f"users online: {doc.get('users_online', '?')}", file=out)
    return 0 if healthy else 1


# -- command line ----------------------------------------------------------------


def user_id(text: str) -> str:
    """A user id RedMessenger accepts in a hello (docs/protocol.rst), so that
    nothing is stored for a user who could never connect."""
    return _checked("user", text)


def group_id(text: str) -> str:
    """A group id by the same rule: ``rm.groups.`` alone is a channel
    RedMessenger ignores, so ``send --group ""`` would reach nobody."""
    return _checked("group", text)


def _checked(kind: str, text: str) -> str:
    try:
        return check_id(kind, text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def health_url(text: str) -> str:
    """``http://host:port`` (or a full ``.../health`` URL) to the health URL."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r}: expected http://host:port")
    path = parts.path if parts.path.endswith("/health") else parts.path.rstrip("/") + "/health"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def websocket_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ws://host:port/ or wss://")
    return text


async def cmd_listen(reactor: Any, args: argparse.Namespace, out: TextIO) -> int:
    from .listen import listen

    if args.key_file is not None and not os.access(args.key_file, os.R_OK):
        raise CommandFailed(f"--key-file {args.key_file}: cannot read it")
    return await listen(reactor, args, out.buffer, sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="redmessenger",
        description="Talk to the Redis behind RedMessenger, and to RedMessenger itself.",
        epilog="Exit status: 0 done, 1 failed (unreachable, or an error answer), "
               "2 usage error.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--redis", metavar="URL",
        default=environment.value("redis", DEFAULT_REDIS),
        help="redis://[[user]:password@]host[:port][/db] or unix:///path[?db=N] "
             f"(default: $REDMESSENGER_REDIS, else {DEFAULT_REDIS})")
    parser.add_argument(
        "--data-dir", metavar="DIR",
        default=environment.value("data-dir", DEFAULT_DATA_DIR),
        help="the data directory of RedMessenger's embedded Redis, as its --data-dir: "
             "a --redis URL without a password, naming the port that Redis last ran on "
             "here, uses the password kept there (default: $REDMESSENGER_DATA_DIR, "
             f"else {DEFAULT_DATA_DIR})")
    parser.add_argument(
        "--prefix", default=environment.value("prefix", "rm"),
        help="the prefix of every channel and key, as RedMessenger's --prefix "
             "(default: $REDMESSENGER_PREFIX, else rm)")
    parser.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="give up on Redis or RedMessenger after this long "
                             "(default: %(default)g)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    send = commands.add_parser(
        "send", help="publish a message to a user or a group",
        description="PUBLISH to rm.users.<uid> or rm.groups.<gid>. If no RedMessenger "
                    "is subscribed (PUBLISH reached nobody), store the message in the "
                    "queue of the user (or of each group member) in RedMessenger's "
                    "envelope, so it is delivered when they connect.")
    whom = send.add_mutually_exclusive_group(required=True)
    whom.add_argument("--user", "-u", type=user_id, metavar="UID")
    whom.add_argument("--group", "-g", type=group_id, metavar="GID")
    send.add_argument("payload", metavar="PAYLOAD",
                      help="what to send; - reads it (any bytes) from standard input")
    send.add_argument("--queue-ttl", type=_non_negative, default=0, metavar="SECONDS",
                      help="when storing: expire the queue this long after the store, as "
                           "RedMessenger's --queue-ttl (default: 0, never)")
    send.add_argument("--queue-max", type=_non_negative, default=0, metavar="N",
                      help="when storing: keep only the newest N messages, as "
                           "RedMessenger's --queue-max (default: 0, unbounded)")
    send.set_defaults(run=cmd_send)

    queue = commands.add_parser(
        "queue", help="show a user's stored messages",
        description="The length of rm:users:<uid>:messages and its oldest messages, "
                    "decoded. Nothing is removed.")
    queue.add_argument("user", type=user_id, metavar="UID")
    queue.add_argument("--count", "-n", type=_non_negative, default=10, metavar="N",
                       help="how many of the oldest to show (default: %(default)s)")
    queue.add_argument("--json", action="store_true",
                       help="one JSON envelope per line (raw entries: \"raw\": true)")
    queue.set_defaults(run=cmd_queue)

    group = commands.add_parser(
        "group", help="manage a group's members",
        description="Edit rm:groups:<gid>:members. An existing list stays a list (new "
                    "members are appended, none twice) and an existing set a set; a new "
                    "group is created as a set.")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("add", "add members"), ("remove", "remove members")):
        action = actions.add_parser(name, help=text, description=text.capitalize() + ".")
        action.add_argument("group", metavar="GID")
        action.add_argument("users", nargs="+", type=user_id, metavar="UID")
    listing = actions.add_parser("list", help="list the members, one per line",
                                 description="List the members, one per line.")
    listing.add_argument("group", metavar="GID")
    group.set_defaults(run=cmd_group)

    token = commands.add_parser(
        "token", help="set or show a user's key",
        description="rm:users:<uid>:key, the key a hello must present "
                    "(--auth required or optional).")
    actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    setting = actions.add_parser(
        "set", help="set the key (a new random one if none is given)",
        description="Set the user's key. Without TOKEN a strong random one is made "
                    "and printed; - reads it from standard input (keeps it out of ps).")
    setting.add_argument("user", type=user_id, metavar="UID")
    setting.add_argument("token", nargs="?", metavar="TOKEN")
    showing = actions.add_parser("show", help="print the key",
                                 description="Print the user's key.")
    showing.add_argument("user", type=user_id, metavar="UID")
    token.set_defaults(run=cmd_token)

    dead = commands.add_parser(
        "dead", help="show, push back or drop messages Redis refused for good",
        description="rm:dead holds the messages Redis refused for good (a queue key of "
                    "another type, a value too big): the envelope, the key it was for, "
                    "Redis's error and when.")
    actions = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="show the dead letters, oldest first",
                                 description="Show the dead letters, oldest first.")
    listing.add_argument("ids", nargs="*", metavar="ID", help="only these message ids")
    listing.add_argument("--json", action="store_true", help="one entry per line, as stored")
    retry = actions.add_parser(
        "retry", help="push dead letters back to their queues",
        description="Append each dead letter (or those given) to the queue it was for; "
                    "those Redis takes leave rm:dead, the others stay. Exit status 1 if "
                    "any is still refused.")
    retry.add_argument("ids", nargs="*", metavar="ID", help="only these message ids")
    retry.add_argument("--queue-ttl", type=_non_negative, default=0, metavar="SECONDS",
                       help="as RedMessenger's --queue-ttl (default: 0, never)")
    retry.add_argument("--queue-max", type=_non_negative, default=0, metavar="N",
                       help="as RedMessenger's --queue-max (default: 0, unbounded)")
    drop = actions.add_parser("drop", help="delete dead letters",
                              description="Delete the dead letters given, or all of them.")
    drop.add_argument("ids", nargs="*", metavar="ID", help="these message ids")
    drop.add_argument("--all", action="store_true", help="every dead letter")
    dead.set_defaults(run=cmd_dead)

    status = commands.add_parser(
        "status", help="list the live RedMessenger nodes, or ask one how it is",
        description="List the live nodes of --prefix, from Redis: each one's sockets, "
                    "users and storer partitions, the totals, and the partitions no live "
                    "node holds. Exit status 1 if no node is live. With --url, GET /health "
                    "from that one RedMessenger instead and print it: exit status 0 if it "
                    "answered 200 (healthy), 1 otherwise.")
    status.add_argument("--url", type=health_url, metavar="URL",
                        help="ask this RedMessenger, http://host:port (or https://), over "
                             "HTTP")
    status.add_argument("--ca", metavar="FILE",
                        help="with an https:// --url: trust the CA certificates in this PEM "
                             "file (else the system's)")
    status.add_argument("--json", action="store_true",
                        help="one JSON document (with --url, the report as it came)")
    status.set_defaults(run=cmd_status, here=cmd_health)

    listening = commands.add_parser(
        "listen", help="print a user's messages as they come",
        description="Connect to RedMessenger as the user and print each message as it "
                    "comes, one JSON object a line, on stdout; how the connection goes on "
                    "stderr. Reconnects with backoff. Ends on Ctrl-C or a closed stdout "
                    "(status 0), or when refused for good, a wrong key say (status 1).")
    listening.add_argument("--url", required=True, type=websocket_url, metavar="URL",
                           help="RedMessenger's WebSocket, ws://host:port/ (or wss://)")
    listening.add_argument("--id", required=True, type=user_id, help="the user id")
    keys = listening.add_mutually_exclusive_group()
    keys.add_argument("--key", help="the user's key (seen by ps: prefer --key-file)")
    keys.add_argument("--key-file", metavar="FILE", help="read the user's key from FILE")
    listening.add_argument("--ack", action="store_true",
                           help="ack mode: acknowledge each message once its line is written "
                                "and flushed; what could not be written comes again at the "
                                "next connect")
    listening.add_argument("--raw", action="store_true",
                           help="print each payload alone, with a newline")
    listening.set_defaults(here=cmd_listen)
    return parser


def with_embedded_password(address: RedisAddress, data_dir: Path) -> RedisAddress:
    """The address, with the embedded Redis's password if it is that Redis:
    plain TCP to this host, no password given, and the port ``data_dir``'s
    server last listened on (so another local Redis is never sent it)."""
    if (address.path is not None or address.tls or address.sentinels
            or address.password is not None or address.username is not None
            or address.host not in _LOCAL_HOSTS):
        return address
    password = datadir.embedded_password(data_dir, address.port)
    return address if password is None else dataclasses.replace(address, password=password)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        address = None
        if getattr(args, "url", None) is None:  # status --url and listen need no Redis
            if not args.prefix:
                parser.error("--prefix must not be empty")
            try:
                address = with_embedded_password(RedisAddress.from_url(args.redis),
                                                 Path(args.data_dir))
            except ValueError as e:
                parser.error(f"--redis: {e}")
    except SystemExit as e:
        return _exit_code(e.code)

    from twisted.internet import task

    async def run(reactor: Any) -> None:
        code = await _run(reactor, args, address)
        if code:
            raise SystemExit(code)

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as e:
        return _exit_code(e.code)
    return 0


async def _run(reactor: Any, args: argparse.Namespace, address: RedisAddress | None) -> int:
    out = sys.stdout
    try:
        if address is None:
            return await args.here(reactor, args, out)
        redis = await connect_redis(reactor, address, args.timeout)
        command: Callable[..., Awaitable[int]] = args.run
        try:
            return await command(redis, Namespace(args.prefix), args, out)
        finally:
            redis.close()
    except CommandFailed as e:
        out.flush()
        print(f"redmessenger: {e}", file=sys.stderr)
        return 1
    except Exception:
        out.flush()
        print("redmessenger: unexpected error:", file=sys.stderr)
        traceback.print_exc()
        return 1


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2,5``: a node may hold many partitions."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) or "-"


def _why(error: BaseException) -> str:
    return str(error).strip() or type(error).__name__


def _exchange_failed(error: BaseException, ca: str | None) -> str:
    """Why an HTTP exchange broke, in one line: Twisted's ResponseFailed
    and its kin hold a list of Failures, the first of which says it."""
    reasons = getattr(error, "reasons", None) or []
    cause = reasons[0].value if reasons and hasattr(reasons[0], "value") else error
    tls = tls_error(cause)
    if tls is None:
        return _why(cause)
    hint = "" if ca else " (a private CA? give its certificate with --ca FILE)"
    return f"TLS: {tls}{hint}"


def _show_payload(payload: bytes) -> str:
    """Text as a JSON string (quotes and escapes make its end visible);
    other bytes as base64."""
    try:
        return json.dumps(payload.decode("utf-8"), ensure_ascii=False)
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(payload).decode("ascii")


if __name__ == "__main__":
    sys.exit(main())
