"""Who has sockets where, cluster-wide, as of the current point of this
node's subscriber stream.

Every subscriber connection of a Redis hears all publishes in one order,
and a socket's join and leave are published by the scripts that record
them (``lua/join.lua``, ``lua/leave.lua``). So each node, and the storer of
each partition, knows at every point of its stream exactly which sockets a
user has; the router decides each message there:

- a node delivers to a user from the point it hears its own socket join
  until it hears it leave, and stores what its sockets cannot take;
- the storer of the user's partition stores a message heard while the user
  has no socket anywhere, and skips it otherwise;
- a node's joining socket is drained once the storer's stores from before
  the join are in Redis: the storer says so (``F``) when it hears the join,
  on the connection its stores went on. A node that is the storer itself
  stores and takes on one connection: no fence to wait for.

This module is that bookkeeping, and no I/O (docs/scaling.rst).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

#: How often a node that waits for others to say they are done (a joining
#: socket's, or the stores of a user whose socket left another node: ``G``)
#: checks whether they still live. A dead node never says it; a live one
#: does, however late Redis takes its writes (replicas late, out of memory),
#: and is waited for as long as its lease (3 s) lives.
LEAVING_TIMEOUT = 5.0
#: How long a socket stays among its user's leaving sockets at most
#: (lua/leave.lua): past that nobody waits for its ``G`` any more.
LEAVING_MAX = 60.0


def partition_of(uid: str, partitions: int) -> int:
    """A user's storer partition: the last byte of its id, modulo the
    number of partitions (what ``Namespace.partition_patterns`` matches)."""
    return uid.encode()[-1] % partitions


def owner_of(socket: str) -> str:
    """Socket ids are ``<owner>:<n>``."""
    return socket.partition(":")[0]


class _Joining:
    """A socket of this node whose user's drain may not begin yet."""

    __slots__ = ("uid", "partition", "heard", "fenced", "leaving", "gone", "ready")

    def __init__(self, uid: str, partition: int, local: bool) -> None:
        self.uid = uid
        self.partition = partition
        #: The join was heard: the node delivers to the user from there.
        #: (A socket of a partition stored here needs not be: see ``joining``.)
        self.heard = local
        #: The storer's stores from before the join are in Redis.
        self.fenced = local
        #: Sockets of the user on other nodes that had just left (known once
        #: the join is recorded), and those of them whose node has since
        #: stored what it heard for the user before (``G``).
        self.leaving: set[str] | None = None
        self.gone: set[str] = set()
        self.ready: defer.Deferred = defer.Deferred()

    def settled(self) -> bool:
        return self.heard and self.fenced and self.leaving is not None and \
            self.leaving <= self.gone


class ClusterView:
    """What this node (``owner``) knows of every user it follows: its own
    users, and those of the storer partitions it holds."""

    def __init__(self, owner: str, partitions: int) -> None:
        self.owner = owner
        self.partitions = partitions
        #: The storer partitions this node decides for.
        self.held: set[int] = set()
        #: Partitions this (stopping) node offers to the others.
        self.offered: set[int] = set()
        #: Who holds each partition, as last heard (``None``: nobody).
        self.storers: dict[int, str | None] = {}
        #: Sockets on other nodes, per user followed: socket id -> join order.
        self.others: dict[str, dict[str, int]] = {}
        #: This node's sockets whose join was heard and whose leave was not,
        #: per user, with their join order.
        self.mine: dict[str, dict[str, int]] = {}
        self._joining: dict[str, _Joining] = {}
        #: The same sockets, per user: a user's leave events reach only its
        #: own (a failover's reaping says thousands while thousands join).
        self._joining_of: dict[str, set[str]] = {}
        #: Called when a user's newest socket, cluster-wide, moves to or
        #: from another node: ``outbid(uid, True)`` while it is elsewhere.
        self.outbid: Callable[[str, bool], None] = lambda uid, elsewhere: None
        #: Called with a socket of this node pushed out by a join elsewhere
        #: (past --max-sockets-per-user).
        self.evicted: Callable[[str], None] = lambda socket: None
        #: Called with ``(uid, socket)`` when a socket of this node was heard
        #: leaving (or pushed out): the node no longer delivers for it.
        self.left: Callable[[str, str], None] = lambda uid, socket: None
        #: Called with a user something was stored for, to be drained now
        #: (``durable_publish()``, the inbox), if it may have a socket here.
        self.woken: Callable[[str], None] = lambda uid: None
        #: Users of partitions held here whose last socket, on another
        #: node, left: this node stores for them once that node says it has
        #: stored what it heard before (``G``).
        self._awaiting_gone: dict[str, set[str]] = {}
        #: Called with ``(uid, socket)`` when this node's stores for the
        #: user begin to wait for the socket's node; ``unparking(uid)`` when
        #: they no longer do (the router's).
        self.parking: Callable[[str, str], None] = lambda uid, socket: None
        self.unparking: Callable[[str], None] = lambda uid: None
        #: Called with a partition this node now decides for.
        self.acquired: Callable[[int], None] = lambda partition: None
        #: Called with a partition another node says it took from this one:
        #: this node offered it, or counted as dead (or the other node uses
        #: the same prefix on another database: pub/sub ignores databases).
        self.taken_from_us: Callable[[int], None] = lambda partition: None
        #: Called with ``(uid, socket)`` when this node, as storer, heard
        #: another node's socket join: publish the fence after the stores.
        self.fence: Callable[[str, str], None] = lambda uid, socket: None

    # -- what the router asks, per message --------------------------------

    def holds(self, uid: str) -> bool:
        return uid.encode()[-1] % self.partitions in self.held

    # -- a socket of this node --------------------------------------------

    def joining(self, uid: str, socket: str, local: bool = False) -> defer.Deferred:
        """Fires once the user's drain may begin on this node: its join
        heard, the stores decided before it in Redis (the storer's, and
        those of nodes whose sockets of the user had just left). ``local``:
        this node stores for the user, on the connection it takes on, in
        the order it decided: only other nodes' leaving sockets matter."""
        state = self._joining[socket] = _Joining(uid, partition_of(uid, self.partitions), local)
        self._joining_of.setdefault(uid, set()).add(socket)
        return state.ready

    def recorded(self, socket: str, leaving: list[str]) -> None:
        """The join is in Redis: the sockets of the user that had just left
        (this node's own need no waiting: it decides in order)."""
        state = self._joining.get(socket)
        if state is not None:
            state.leaving = {s for s in leaving if owner_of(s) != self.owner}
            self._may_settle(socket)

    def abandon(self, socket: str) -> None:
        """The socket is gone, maybe before its join completed: whoever
        waits for it goes on (and finds it gone)."""
        self._complete(socket)

    def awaited(self, socket: str) -> set[tuple[str, str | None]] | None:
        """What the socket's join still waits for (``None``: nothing), as
        ``(node, leaving socket or None)``: its own node until the join is
        recorded, the storer until it fenced, the user's leaving sockets
        until each is gone."""
        state = self._joining.get(socket)
        if state is None:
            return None
        waits: set[tuple[str, str | None]] = {
            (owner_of(s), s) for s in (state.leaving or set()) - state.gone}
        if state.leaving is None:
            waits.add((self.owner, None))
        storer = self.storers.get(state.partition)
        if not state.fenced and storer is not None:
            waits.add((storer, None))
        return waits

    def give_up(self, socket: str) -> None:
        """None of the nodes the socket's join waited for lives any more
        (or it waited for its own join to be heard, or as long as a socket
        stays among the leaving): its drain begins all the same. A dead
        node's claims come back with the drain's first take, and its stores
        are refused."""
        state = self._joining.get(socket)
        if state is not None:
            log.warn("Socket {socket} of {uid} stops waiting for its join to complete "
                     "(heard {heard}, fenced {fenced}, others' leaving sockets not done: "
                     "{leaving}); draining it", socket=socket,
                     uid=state.uid, heard=state.heard, fenced=state.fenced,
                     leaving=sorted((state.leaving or set()) - state.gone))
            self._complete(socket)

    def fail(self, socket: str, reason: Exception) -> None:
        """The socket's join could not be recorded."""
        state = self._stop_joining(socket)
        if state is not None:
            state.ready.errback(reason)

    def waiting(self) -> list[tuple[str, str]]:
        """``(uid, socket)`` of the joins not complete yet (to join again
        after the subscriber lost events)."""
        return [(state.uid, socket) for socket, state in self._joining.items()]

    def _complete(self, socket: str) -> None:
        state = self._stop_joining(socket)
        if state is not None:
            state.ready.callback(None)

    def _stop_joining(self, socket: str) -> _Joining | None:
        state = self._joining.pop(socket, None)
        if state is not None:
            sockets = self._joining_of[state.uid]
            sockets.discard(socket)
            if not sockets:
                del self._joining_of[state.uid]
        return state

    def _may_settle(self, socket: str) -> None:
        state = self._joining.get(socket)
        if state is not None and state.settled():
            self._complete(socket)

    def _needs_fence(self, state: _Joining) -> bool:
        storer = self.storers.get(state.partition)
        return state.partition not in self.held and storer is not None

    # -- what the stream says ---------------------------------------------

    def heard_presence(self, uid: str, payload: bytes) -> None:
        """An event on the user's presence channel (see lua/join.lua)."""
        kind, _, rest = payload.partition(b" ")
        if kind == b"J":
            socket, seq, evicted, *sockets = rest.decode().split(" ")
            self._joined(uid, socket, int(seq), evicted,
                         dict(zip(sockets[::2], map(int, sockets[1::2]), strict=True)))
        elif kind == b"L":
            self._left(uid, rest.decode())
        elif kind == b"F":
            socket = rest.decode()
            state = self._joining.get(socket)
            if state is not None:
                state.fenced = True
                self._may_settle(socket)
        elif kind == b"G":
            socket = rest.decode()
            self.gone(uid, socket)
            for waiting in list(self._joining_of.get(uid, ())):
                self._joining[waiting].gone.add(socket)
                self._may_settle(waiting)
            if uid in self.mine and owner_of(socket) != self.owner:
                # What it held is back at the head of the user's queue: the
                # user's sockets here get it now, not at their next connect.
                self.woken(uid)
        elif kind == b"W":
            if uid in self.mine or self.holds(uid):
                self.woken(uid)
        else:
            log.warn("Ignoring an unknown presence event for {uid}: {kind!r}", uid=uid,
                     kind=kind[:20])

    def _joined(self, uid: str, socket: str, seq: int, evicted: str,
                sockets: dict[str, int]) -> None:
        mine = owner_of(socket) == self.owner
        if not mine and not (uid in self.mine or self.holds(uid)):
            return  # not followed here (a stale subscription)
        was = self._outbid(uid)
        if evicted != "-" and owner_of(evicted) == self.owner:
            self._drop_mine(uid, evicted)
            self.evicted(evicted)
        if mine:
            self.mine.setdefault(uid, {})[socket] = seq
        # Every join carries the user's sockets after it: the view of
        # other nodes' sockets is exact again from here.
        others = {s: q for s, q in sockets.items() if owner_of(s) != self.owner}
        if others:
            self.others[uid] = others
        else:
            self.others.pop(uid, None)
        if mine:
            state = self._joining.get(socket)
            if state is not None:
                state.heard = True
                state.fenced = state.fenced or not self._needs_fence(state)
                self._may_settle(socket)
        elif self.holds(uid):
            self.fence(uid, socket)
        self._may_outbid(uid, was)

    def _left(self, uid: str, socket: str) -> None:
        if owner_of(socket) == self.owner:
            self._drop_mine(uid, socket)
            return
        others = self.others.get(uid)
        if others is None or socket not in others:
            return
        was = self._outbid(uid)
        del others[socket]
        if not others:
            del self.others[uid]
            if self.holds(uid) and uid not in self.mine:
                # Absent from here on, so this node stores for the user;
                # but the socket's node may still store what it heard
                # before: this node's stores wait until it is done (G).
                self._awaiting_gone.setdefault(uid, set()).add(socket)
                self.parking(uid, socket)
        self._may_outbid(uid, was)

    def gone(self, uid: str, socket: str) -> None:
        """The socket's node has stored what it heard for the user before
        the socket left (``G``), or it died."""
        awaiting = self._awaiting_gone.get(uid)
        if awaiting is None or socket not in awaiting:
            return
        awaiting.discard(socket)
        if not awaiting:
            del self._awaiting_gone[uid]
            self.unparking(uid)

    def _drop_mine(self, uid: str, socket: str) -> None:
        mine = self.mine.get(uid)
        if mine is None or mine.pop(socket, None) is None:
            return
        if not mine:
            del self.mine[uid]
            if not self.holds(uid):
                self.others.pop(uid, None)
        self.left(uid, socket)

    def forget(self, uid: str, socket: str) -> None:
        """A socket of this node left without an event (it had already
        been pushed out, or reaped)."""
        self._drop_mine(uid, socket)

    def _outbid(self, uid: str) -> bool:
        mine = self.mine.get(uid)
        others = self.others.get(uid)
        return bool(mine and others and max(others.values()) > max(mine.values()))

    def _may_outbid(self, uid: str, was: bool) -> None:
        now = self._outbid(uid)
        if now != was:
            self.outbid(uid, now)

    # -- storer partitions ------------------------------------------------

    def heard_cluster(self, payload: bytes) -> None:
        """``E <partition> <owner>``: a node took a partition; ``R ...``: a
        node gave one up. (``O`` and ``D``, offers and handovers, are the
        router's and membership's.)"""
        kind, partition, owner = payload.decode().split(" ")
        k = int(partition)
        if kind == "E":
            self.storers[k] = owner
            if owner != self.owner and k in self.held:
                if k in self.offered:  # handed over from this point
                    self.offered.discard(k)
                    self.resigned(k)
                self.taken_from_us(k)
        elif kind == "R" and self.storers.get(k) == owner:
            self.storers[k] = None
        else:
            return
        self._storer_changed(k)

    def took(self, payload: bytes) -> tuple[int, bool]:
        """``<partition> <how> <json>`` (after ``S``) on this node's channel: it decides
        for the partition from here, knowing its users' sockets. Whether it
        was handed over by a live node (which stores until it hears this)."""
        partition, how, snapshot = payload.split(b" ", 2)
        k = int(partition)
        self.held.add(k)
        self.storers[k] = self.owner
        for uid in [u for u in self.others if partition_of(u, self.partitions) == k]:
            del self.others[uid]  # the snapshot says it all (events may have been lost)
        for uid, flat in (json.loads(snapshot) or {}).items():
            flat = flat or []
            others = {s: int(q) for s, q in zip(flat[::2], flat[1::2], strict=True)
                      if owner_of(s) != self.owner}
            if others:
                self.others[uid] = others
        self._storer_changed(k)
        self.acquired(k)
        return k, how == b"2"

    def resigned(self, partition: int) -> None:
        self.held.discard(partition)
        if self.storers.get(partition) == self.owner:
            self.storers[partition] = None
        for uid in [u for u in self.others if u not in self.mine and
                    partition_of(u, self.partitions) == partition]:
            del self.others[uid]

    def parked_on(self, uid: str, socket: str) -> bool:
        """Whether this node's stores for the user still wait for the
        socket's node (see ``_left``)."""
        return socket in self._awaiting_gone.get(uid, ())

    def _storer_changed(self, partition: int) -> None:
        """A new storer's snapshot had every join heard before it; one gone
        left nothing to wait for."""
        for socket, state in list(self._joining.items()):
            if state.partition == partition and state.heard:
                state.fenced = True
                self._may_settle(socket)
