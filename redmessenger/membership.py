"""This node's part in a cluster of RedMessengers that share one Redis: its
lease, its sockets' presence, and the storer partitions it decides for.

``presence`` keeps what the stream says, and ``routing`` decides each
message with it; this module says the node's own moves to Redis, in the
scripts that publish them (docs/scaling.rst):

- **The lease** (``<prefix>:procs:<owner>``) lives ``LEASE_TTL`` and is
  renewed every ``LEASE_EVERY``. A node whose lease is gone counts as dead:
  what it held is taken over, and the scripts refuse its stores and joins
  (``FENCED``). If it comes back and finds anything taken, it must start
  over (``lost``).
- **A socket joins** with ``lua/join.lua`` once the node is subscribed to
  its user's channels (unless the node stores for the user's partition
  and hears them anyway), and leaves with ``lua/leave.lua``.
- **Storer partitions** are taken when vacant, when their holder's lease is
  gone, or when offered by a stopping node, up to this node's share. The
  node that holds partition 0 also reaps the sockets of dead nodes.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Awaitable, Callable

from twisted.internet import defer, task
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from . import lua
from .keys import Namespace
from .presence import LEAVING_MAX, LEAVING_TIMEOUT, ClusterView, partition_of
from .redisconnection import (
    RETRY_MAX_DELAY,
    RedisConnection,
    RedisUnavailable,
    Script,
    txredisapi,
)
from .store import RedisStore
from .subscriber import Subscriber

log = Logger()

#: A node silent for LEASE_TTL seconds counts as dead; what it held beyond
#: its sockets is taken over within LEASE_TTL + TICK_EVERY.
LEASE_TTL = 3.0
LEASE_EVERY = 1.0
TICK_EVERY = 0.5
#: How many times a takeover refused for a lapsed lease renews and tries again.
ACQUIRE_ATTEMPTS = 5
#: How long a stopping node waits for another to take its partitions.
HANDOVER_TIMEOUT = 3.0
#: Once this node is back on Redis after losing it, how long it counts no
#: other node as dead: Redis was likely away for all of them (a restart, a
#: failover), and their leases lapsed with it. Each is back within its
#: reconnect backoff, and renews within a lease's time.
RECONNECT_GRACE = RETRY_MAX_DELAY + LEASE_TTL

JOIN = Script(lua.source("join", "live"))
LEAVE = Script(lua.source("leave"))
GONE = Script(lua.source("gone"))
ACQUIRE = Script(lua.source("acquire", "live"))
OFFER = Script(lua.source("offer"))
RESIGN = Script(lua.source("resign"))
REAP = Script(lua.source("reap", "recover"), durable=True)  # puts claims back
#: Sent with EVAL on a "now" command: it must not wait behind writes Redis
#: refuses (out of memory), or the lease would expire meanwhile.
RENEW = Script(lua.source("renew"))

SCRIPTS = (JOIN, LEAVE, GONE, ACQUIRE, OFFER, RESIGN, REAP)


class FencedOut(Exception):
    """This node's lease is gone and something was taken from it."""


class JoinFailed(Exception):
    """Redis refused a socket's join: the socket cannot be served here."""


class Membership:
    """The ``Presence`` the dispatcher joins and leaves sockets through."""

    def __init__(self, redis: RedisConnection, lease_redis: RedisConnection,
                 store: RedisStore, subscriber: Subscriber,
                 view: ClusterView, namespace: Namespace, whereabouts: str, reactor, *,
                 max_sockets: int, partitions: int = 1,
                 lost: Callable[[], object] = lambda: None) -> None:
        self._redis = redis
        self._lease_redis = lease_redis
        self._store = store
        self._subscriber = subscriber
        self.view = view
        self._ns = namespace
        self.owner = view.owner
        self._whereabouts = whereabouts
        self._reactor = reactor
        self._max_sockets = max_sockets
        self._wanted_partitions = partitions
        self._lost = lost
        self._lease_key = namespace.process(self.owner)
        self._ids = itertools.count(1)
        #: Sockets that left during a drain: fires once what they held is
        #: on its way back to Redis, and their gone (``G``) may be said.
        self._returning: dict[str, defer.Deferred] = {}
        #: Sockets whose leave was sent and not yet heard: socket -> uid.
        self._unheard: dict[str, str] = {}
        #: Sockets whose user's channels this node follows: socket -> uid.
        self._following: dict[str, str] = {}
        #: Sockets whose join waits for their channels to be subscribed.
        self._subscribing: set[str] = set()
        #: Of those, the ones that left meanwhile: no join is sent for them.
        self._cancelled: set[str] = set()
        #: The partitions found vacant at start, taken once subscribed.
        self._first: list[int] = []
        #: Partitions being taken: fired when this node hears it has them.
        self._taking: dict[int, defer.Deferred] = {}
        #: Partitions offered by this node: fired when taken.
        self._offered: dict[int, defer.Deferred] = {}
        #: Sockets of users in partitions held here, heard through the
        #: partition's patterns: socket -> uid.
        self._held_sockets: dict[str, str] = {}
        self._renewing = LoopingCall(self._renew)
        self._renewing.clock = reactor
        self._ticking = LoopingCall(self._tick_once)
        self._ticking.clock = reactor
        #: The tick under way, waited for by a stop (its commands must be
        #: answered before Redis is let go).
        self._tick_in_flight: defer.Deferred | None = None
        self.stopping = False
        #: Whether ``start`` has begun: a stop then leaves the cluster.
        self.started = False
        self.is_lost = False
        view.left = self._left
        view.acquired = self._acquired
        view.taken_from_us = self._taken_from_us
        view.fence = self._fence
        store.fenced = self.lease_checked
        self._checking: defer.Deferred | None = None
        self._waiting_checks: list[defer.Deferred] = []
        self._renewed_at: float | None = None
        #: Renewals Redis refused in a row.
        self._refusals = 0
        self._reconnects_seen = 0
        #: Until when no other node counts as dead (``RECONNECT_GRACE``).
        self._grace_until: float | None = None
        #: The longest time between two renewals of the lease, in seconds:
        #: how close this node came to counting as dead (``LEASE_TTL``).
        self.longest_renewal_gap = 0.0
        subscriber.prepare = self._prepare
        #: Called with a partition whose handover is over (the giver said
        #: so, or was waited for long enough): the router's.
        self.handed_over: Callable[[int], None] = lambda partition: None
        #: What this node says of itself in Redis, renewed with its lease.
        self.describe: Callable[[], dict] = dict
        #: Called whenever the partitions this node holds change.
        self.partitions_changed: list[Callable[[], object]] = []

    # -- starting and stopping ---------------------------------------------

    async def start(self) -> None:
        """Before the subscriber connects: take the lease, learn how many
        partitions the cluster has, and add the patterns of those this node
        will try to take, so that they are subscribed with the rest."""
        redis = self._redis
        self.started = True
        await redis.execute(b"SET", self._lease_key, self._whereabouts.encode(), b"PX",
                            int(LEASE_TTL * 1000))
        await redis.execute(b"SADD", self._ns.nodes, self.owner)
        await redis.execute(b"SET", self._ns.partitions, self._wanted_partitions, b"NX")
        count = int(await redis.execute(b"GET", self._ns.partitions))
        if count != self._wanted_partitions:
            log.info("The cluster has {count} storer partitions (set by its first node); "
                     "--partitions {wanted} is ignored", count=count,
                     wanted=self._wanted_partitions)
        self.view.partitions = count
        if self.stopping:
            return
        self._renewing.start(LEASE_EVERY, now=True)  # and it says what it is at once
        self._first = await self._vacant(count)
        for k in self._first:
            self._subscriber.psubscribe(self._ns.partition_patterns(k, count))

    def _prepare(self, again: bool) -> defer.Deferred:
        """Once subscribed: take the vacant partitions found at start, then
        look again every ``TICK_EVERY``. Subscribed again after a loss:
        take the held partitions again (with their presence as it is now),
        and join again what waits for a storer's fence (events were lost)."""
        if not self._ticking.running:
            return defer.ensureDeferred(self._take_first())
        return defer.ensureDeferred(self._again())

    async def _take_first(self) -> None:
        await self._take(self._first)
        self._ticking.start(TICK_EVERY, now=False)

    async def _again(self) -> None:
        held = sorted(self.view.held)
        await self._take(held)
        if any(k not in self.view.held for k in held):
            log.critical("Storer partitions {held} were taken over while the subscriber "
                         "was away: this node counted as dead", held=held)
            self._lose()
        self._resubscribed()

    async def stop(self) -> None:
        """After the sockets left: hand the partitions over to another node
        (or give them up when none takes them), then leave the cluster."""
        self.stopping = True
        if self._ticking.running:
            self._ticking.stop()
        if self._tick_in_flight is not None and not self._tick_in_flight.called:
            await self._tick_in_flight
        if not self._redis.connected:
            if self._renewing.running:
                self._renewing.stop()
            return  # Redis is away: the lease expires by itself
        others = self.view.held and await self._live_nodes() > 1
        if others:
            offers = [self._offered.get(k) or await self._offer(k)
                      for k in sorted(self.view.held)]
            try:
                await defer.DeferredList(offers).addTimeout(HANDOVER_TIMEOUT, self._reactor)
            except defer.TimeoutError:
                pass
        for k in sorted(self.view.held):
            if others:
                log.warn("No other node took storer partition {k}: nobody stores for its "
                         "offline users until one does", k=k)
            await self._redis.eval(RESIGN, [self._ns.storer(k), self._offer_key(k)],
                                   [self.owner, k, self._ns.cluster_channel])
            self.view.resigned(k)
        await self._store.flushed()
        if self._renewing.running:
            self._renewing.stop()
        # Nothing is held any more: say so (or let it expire).
        await self._redis.execute_now(b"DEL", self._lease_key)
        await self._reap(self.owner)

    # -- sockets ------------------------------------------------------------

    def socket_id(self) -> str:
        return f"{self.owner}:{next(self._ids)}"

    def join(self, uid: str, socket: str) -> defer.Deferred:
        """Record the socket's presence; fires once the user's drain may
        begin on this node (or once no node it waits for lives)."""
        ready = self._join(uid, socket)
        patience = self.wait_on(uid, lambda: self.view.awaited(socket),
                                lambda: self.view.give_up(socket))
        return ready.addBoth(_cancelling, patience)

    def wait_on(self, uid: str, waits: Callable[[], set[tuple[str, str | None]] | None],
                give_up: Callable[[], None]) -> _Patience:
        """Call ``give_up`` once nothing that ``waits()`` still names
        (``(node, the user's leaving socket or None)``; ``None``: nothing)
        holds up: checked every ``LEAVING_TIMEOUT``."""
        return _Patience(self._reactor, lambda node, socket: self._holds_up(uid, node, socket),
                         waits, give_up)

    async def _holds_up(self, uid: str, node: str, socket: str | None) -> bool:
        """Whether the node lives, and the user's socket there, if any, is
        still among the leaving (its ``G`` may have been missed)."""
        if not await self._look(b"EXISTS", self._ns.process(node)):
            return False
        return socket is None or bool(await self._look(b"SISMEMBER", self._ns.leaving(uid),
                                                       socket))

    def _join(self, uid: str, socket: str) -> defer.Deferred:
        if self.view.holds(uid) and partition_of(uid, self.view.partitions) not in \
                self._offered:
            # Its stores and takes go on one connection, in the order this
            # node decided them: only other nodes' leaving sockets matter.
            self._held_sockets[socket] = uid
            ready = self.view.joining(uid, socket, local=True)
            self._send_join(uid, socket).addErrback(self._join_failed, uid, socket)
            return ready
        ready = self.view.joining(uid, socket)
        self._following[socket] = uid
        self._subscribing.add(socket)
        d = self._subscriber.follow(self._channels(uid))
        d.addCallback(self._followed, uid, socket)
        d.addErrback(self._join_failed, uid, socket)
        return ready

    def _followed(self, _, uid: str, socket: str):
        self._subscribing.discard(socket)
        if socket in self._cancelled:
            self._cancelled.discard(socket)
            self._unfollow(socket)
            return None
        return self._send_join(uid, socket)

    def _send_join(self, uid: str, socket: str) -> defer.Deferred:
        ns = self._ns
        d = self._redis.eval(JOIN, [ns.presence(uid), ns.present, ns.node_users(self.owner),
                                    ns.joins, self._lease_key, ns.leaving(uid)],
                             [socket, uid, ns.presence_channel(uid), self._max_sockets,
                              ns.process_prefix])
        return d.addCallback(lambda reply: self.view.recorded(
            socket, [bytes(s).decode() for s in reply[1]]))

    def _join_failed(self, failure, uid: str, socket: str) -> None:
        log.error("Could not record socket {socket} of {uid}: {why}", socket=socket, uid=uid,
                  why=failure.getErrorMessage()[:300])
        self._fenced(failure)
        self.view.fail(socket, JoinFailed(failure.getErrorMessage()[:300]))

    def leave(self, uid: str, socket: str, returned: defer.Deferred | None = None) -> None:
        self.view.abandon(socket)
        self._held_sockets.pop(socket, None)
        if socket in self._subscribing:
            self._cancelled.add(socket)
            return  # no join was sent, so no leave is
        if returned is not None:
            self._returning[socket] = returned
        self._unheard[socket] = uid
        ns = self._ns
        # After what the node stores for the user now: whoever hears the
        # leave and drains the user finds it there.
        d = self._store.eval_after_stores(LEAVE, [ns.presence(uid), ns.present,
                                                  ns.leaving(uid)],
                                          [socket, uid, ns.presence_channel(uid)])
        d.addCallback(self._left_or_gone, uid, socket)
        d.addErrback(self._leave_failed, uid, socket)

    def _leave_failed(self, failure, uid: str, socket: str) -> None:
        # No event will come for it; a node joining the user finds the
        # socket still present (or reaped with this node).
        self._returning.pop(socket, None)
        self._unheard.pop(socket, None)
        log.error("Could not record that socket {socket} of {uid} left: {why}",
                  socket=socket, uid=uid, why=failure.getErrorMessage()[:300])

    def _left_or_gone(self, left: int, uid: str, socket: str) -> None:
        if not left:  # pushed out, or reaped: no event will say it
            self._returning.pop(socket, None)
            self._unheard.pop(socket, None)
            self.view.forget(uid, socket)
            self._unfollow(socket)

    def _left(self, uid: str, socket: str) -> None:
        """The stream says one of this node's sockets left: what this node
        heard for the user before that is decided, and once it is stored
        (and what the socket held is back), a node joining the user may
        drain it (lua/gone.lua)."""
        self._unfollow(socket)
        self._unheard.pop(socket, None)
        returning = self._returning.pop(socket, None)
        if returning is None:
            self._gone(uid, socket)
        else:
            returning.addCallback(lambda _: self._gone(uid, socket))

    def _gone(self, uid: str, socket: str) -> None:
        ns = self._ns
        self._store.eval_after_stores(GONE, [ns.leaving(uid)],
                                      [socket, ns.presence_channel(uid)]).addErrback(
            lambda f: log.warn("Could not say that socket {socket} of {uid} is gone: {why}",
                               socket=socket, uid=uid, why=f.getErrorMessage()[:300]))

    def _unfollow(self, socket: str) -> None:
        uid = self._following.pop(socket, None)
        if uid is not None:
            self._subscriber.unfollow(self._channels(uid))

    def _channels(self, uid: str) -> list[bytes]:
        """Presence first: a message on the user's channel is only heard
        once its presence is."""
        return [self._ns.presence_channel(uid).encode(), self._ns.user_channel(uid).encode()]

    def _resubscribed(self) -> None:
        """Events were missed while the subscriber was away: joins waiting
        for a fence join again (the storer fences each join it hears), and
        held partitions are taken again, with their presence as it is now."""
        for uid, socket in self.view.waiting():
            self._send_join(uid, socket).addErrback(self._join_failed, uid, socket)
        # Leaves whose event was lost are gone all the same (what was heard
        # before them is decided): a node joining their users waits for it.
        for socket, uid in list(self._unheard.items()):
            self.view.forget(uid, socket)  # says it left, if it counted here
            if socket in self._unheard:
                self._left(uid, socket)

    # -- the storer's part --------------------------------------------------

    def _fence(self, uid: str, socket: str) -> None:
        """Another node's socket joined a user of a partition held here:
        once the stores decided before the join are in Redis, it may drain."""
        self._store.publish_after_stores(self._ns.presence_channel(uid).encode(),
                                         b"F " + socket.encode())

    async def _vacant(self, count: int) -> list[int]:
        """Partitions nobody live holds (or that are offered), up to this
        node's share of them."""
        held = len(self.view.held)
        share = math.ceil(count / max(await self._live_nodes(), 1))
        vacant = []
        for k in range(count):
            if len(vacant) + held >= share:
                break
            if k in self.view.held:
                continue
            holder = await self._look(b"GET", self._ns.storer(k))
            holder = None if holder is None else bytes(holder).decode()
            self.view.storers[k] = holder
            if holder is None or holder == self.owner or not await self._look(
                    b"EXISTS", self._ns.process(holder)) or await self._look(
                    b"EXISTS", self._offer_key(k)):
                vacant.append(k)
        return vacant

    async def _live_nodes(self) -> int:
        """Nodes whose lease lives, this one included."""
        live = 0
        for node in await self._look(b"SMEMBERS", self._ns.nodes):
            live += await self._look(b"EXISTS", self._ns.process(bytes(node).decode()))
        return live

    def _look(self, *args) -> defer.Deferred:
        """A read of the cluster's state, on the lease's connection: a
        storm of connects queues thousands of commands on the command
        connection, and a takeover waiting behind them came seconds late.
        What the reads find is checked again by the script that acts."""
        return self._lease_redis.execute(*args)

    async def _take(self, partitions: list[int]) -> None:
        count = self.view.partitions
        for k in partitions:
            if self.stopping:
                return
            patterns = self._ns.partition_patterns(k, count)
            await self._subscriber.psubscribe(patterns)
            heard = self._taking[k] = defer.Deferred()
            taken = await self._acquire(k, count)
            if not taken:
                del self._taking[k]
                if k in self.view.held:
                    self.view.resigned(k)  # lost while away: _again says so
                self._subscriber.punsubscribe(patterns)
                continue
            if taken == 2:
                self._reactor.callLater(LEASE_TTL + HANDOVER_TIMEOUT, self.handed_over, k)
            await heard
            log.info("Storing for the offline users of partition {k} (of {count}){how}",
                     k=k, count=count, how=" handed over by its holder" if taken == 2 else "")

    async def _acquire(self, k: int, count: int) -> int:
        """ACQUIRE, after renewing a lease that lapsed while Redis was away
        (the connection that carries the lease may come back last)."""
        attempt = 0
        while True:
            try:
                return await self._redis.eval(ACQUIRE, [
                    self._ns.storer(k), self._lease_key, self._ns.present, self._offer_key(k)],
                    [self.owner, k, count, self._ns.process_prefix, *self._ns.presence_affixes,
                     self._ns.node_channel(self.owner), self._ns.cluster_channel])
            except txredisapi().ResponseError as e:
                attempt += 1
                if not str(e).startswith("FENCED") or attempt == ACQUIRE_ATTEMPTS:
                    raise
            if not await self.lease_checked():
                raise FencedOut(f"partition {k}: this node's lease is gone")
            await task.deferLater(self._reactor, LEASE_EVERY * attempt / ACQUIRE_ATTEMPTS)

    def _acquired(self, partition: int) -> None:
        d = self._taking.pop(partition, None)
        if d is not None:
            d.callback(None)
        self._changed()

    def _changed(self) -> None:
        for observer in list(self.partitions_changed):
            observer()

    def _taken_from_us(self, partition: int) -> None:
        offered = self._offered.pop(partition, None)
        if offered is not None:
            # What this node decided before the taker's point is in Redis
            # before the taker's first store: it waits for this.
            self._store.publish_after_stores(self._ns.cluster_channel.encode(),
                                             f"D {partition} {self.owner}".encode())
            self._subscriber.punsubscribe(
                self._ns.partition_patterns(partition, self.view.partitions))
            offered.callback(None)
            self._changed()
            return
        d = self._redis.execute(b"GET", self._ns.storer(partition))
        d.addCallback(self._taken_or_not, partition)
        d.addErrback(lambda f: log.failure("Could not check partition {k}", f, k=partition))

    def _taken_or_not(self, holder, partition: int) -> None:
        if holder is not None and bytes(holder).decode() == self.owner:
            log.error("Another RedMessenger took storer partition {k} with this prefix on "
                      "another database of this Redis: pub/sub ignores databases, so use "
                      "another --prefix (docs/operations.rst)", k=partition)
            return
        log.critical("Storer partition {k} was taken over by another node: this node "
                     "counted as dead (its lease expired)", k=partition)
        self.view.resigned(partition)
        self._changed()
        self._lose()

    async def _offer(self, partition: int) -> defer.Deferred:
        """Offer a partition to whichever node takes it first; the Deferred
        fires when one has. The sockets here of its users are heard on
        their own channels first: from the taker's point on, only those
        copies count (see ``Router.received_message``)."""
        d = self._offered[partition] = defer.Deferred()
        d.addErrback(lambda f: f.trap(defer.CancelledError))
        follows = []
        for socket, uid in list(self._held_sockets.items()):
            if partition_of(uid, self.view.partitions) == partition:
                del self._held_sockets[socket]
                self._following[socket] = uid
                follows.append(self._subscriber.follow(self._channels(uid)))
        await defer.DeferredList(follows)
        self.view.offered.add(partition)
        await self._redis.eval(OFFER, [self._ns.storer(partition), self._offer_key(partition)],
                               [self.owner, partition, self._ns.cluster_channel])
        return d

    async def _even_out(self) -> None:
        """A node holding more than its share of the partitions (it ran
        alone, and others started since) offers one, keeping partition 0
        (the inbox, the reaper) where it is."""
        held = self.view.held
        if self._offered or len(held) < 2:
            return
        share = math.ceil(self.view.partitions / max(await self._live_nodes(), 1))
        if len(held) > share:
            partition = max(held)
            log.info("Offering storer partition {k} to another node: this one holds {held} "
                     "of {count}, its share is {share}", k=partition, held=len(held),
                     count=self.view.partitions, share=share)
            await self._offer(partition)

    def _offer_key(self, partition: int) -> str:
        return self._ns.storer(partition) + ":offered"

    def _tick_once(self) -> defer.Deferred:
        d = self._tick_in_flight = defer.ensureDeferred(self._tick())
        return d

    async def _tick(self) -> None:
        """Take partitions whose holder died (or is stopping), and reap
        dead nodes' sockets (the holder of partition 0 does)."""
        if self.stopping or self.is_lost or self._in_grace():
            return
        # Reads wait for Redis: each decision checks the grace again after
        # them, for Redis may have been away (and every lease lapsed) since.
        try:
            vacant = await self._vacant(self.view.partitions)
            if self._in_grace():
                return
            await self._take(vacant)
            await self._even_out()
            if 0 in self.view.held:
                for node in await self._look(b"SMEMBERS", self._ns.nodes):
                    node = bytes(node).decode()
                    if node != self.owner and not await self._look(
                            b"EXISTS", self._ns.process(node)) and not self._in_grace():
                        left = await self._reap(node)
                        log.warn("Node {node} is gone (its lease expired): {count} of its "
                                 "sockets left", node=node, count=left)
        except (RedisUnavailable, FencedOut):
            pass  # Redis is away; or this node lost its place, and stops (_lose)
        except Exception:
            log.failure("The cluster tick failed; trying again in {s} s", s=TICK_EVERY)

    def _in_grace(self) -> bool:
        """Whether this node came back on Redis too recently to count others
        as dead (``RECONNECT_GRACE``)."""
        now = self._reactor.seconds()
        reconnects = self._redis.reconnects + self._lease_redis.reconnects
        if reconnects != self._reconnects_seen:
            self._reconnects_seen = reconnects
            self._grace_until = now + RECONNECT_GRACE
            log.info("Back on Redis: for {seconds:g} s no other node counts as dead (their "
                     "leases lapsed too while Redis was away)", seconds=RECONNECT_GRACE)
        if self._grace_until is None:
            return False
        if now < self._grace_until:
            return True
        self._grace_until = None
        log.info("Counting nodes whose leases lapsed as dead again")
        return False

    def _reap(self, node: str) -> defer.Deferred:
        ns = self._ns
        return self._redis.eval(
            REAP, [ns.node_users(node), ns.present, ns.process(node), ns.nodes],
            [node, *ns.presence_affixes, *ns.presence_channel_affixes, *ns.queue_affixes,
             *ns.claims_affixes, *ns.claim_head_affixes, ns.process_prefix])

    # -- the lease ----------------------------------------------------------

    def _renew(self) -> defer.Deferred:
        """Fires with whether the lease is this node's (``None``: Redis could
        not say)."""
        held = sorted(self.view.held)
        try:
            about = json.dumps({**self.describe(), "partitions": held})
        except Exception:  # the lease matters more than what it says
            log.failure("Could not describe this node")
            about = json.dumps({"partitions": held})
        # On a connection of its own: not behind the commands of a storm of
        # connects, nor behind writes Redis refuses for now.
        d = self._lease_redis.execute_now(
            b"EVAL", RENEW.source, 3, self._lease_key, self._ns.nodes,
            self._ns.node_info(self.owner), self.owner, int(LEASE_TTL * 1000),
            self._whereabouts.encode(), about.encode(), *(self._ns.storer(k) for k in held))
        d.addCallback(self._renewed)
        d.addErrback(lambda f: f.trap(RedisUnavailable))
        d.addErrback(self._not_renewed)
        return d

    def _not_renewed(self, failure) -> None:
        """Redis refused the renewal (``NOREPLICAS`` from a master that lost
        its replicas, say): said once, until a renewal passes again."""
        self._refusals += 1
        if self._refusals == 1:
            log.warn("Could not renew the node's lease: {why}; trying again every "
                     "{every:g} s", why=failure.getErrorMessage()[:300], every=LEASE_EVERY)

    def _renewed(self, kept: int) -> bool:
        if self._refusals:
            log.info("Renewed the node's lease again after {count} refusals",
                     count=self._refusals)
            self._refusals = 0
        if not kept:
            log.critical("This node's lease expired and what it held was taken over "
                         "(Redis was away, or the node stalled, for over {ttl} s)",
                         ttl=LEASE_TTL)
            self._lose()
            return False
        now = self._reactor.seconds()
        if self._renewed_at is not None:
            gap = now - self._renewed_at
            self.longest_renewal_gap = max(self.longest_renewal_gap, gap)
            if gap > LEASE_TTL - LEASE_EVERY:  # one more such delay, and it is dead
                log.warn("This node's lease was renewed {gap:.1f} s after the last renewal "
                         "(it counts as dead after {ttl} s): the event loop or Redis was "
                         "slow", gap=gap, ttl=LEASE_TTL)
        self._renewed_at = now
        return True

    def lease_checked(self) -> defer.Deferred:
        """Redis refused a write because this node's lease had expired (the
        node stalled: a storm of connects, say): renew it now, which takes
        it back if nothing was taken meanwhile. Fires with whether the node
        may go on (its refused writes may be sent again)."""
        d: defer.Deferred = defer.Deferred()
        self._waiting_checks.append(d)
        if self._checking is None:  # (one that is over at once fires d now)
            self._checking = defer.ensureDeferred(self._check())
            self._checking.addBoth(self._checked)
        return d

    async def _check(self) -> bool:
        """Renew the lease once its connection is up; while Redis cannot say
        whether it is ours, ask again a moment later (not at once: what was
        refused would be sent again, and refused, in a tight loop)."""
        while not self.is_lost:
            await self._lease_redis.whenConnected()
            kept = await self._renew()
            if kept is not None:
                return kept
            await task.deferLater(self._reactor, LEASE_EVERY)
        return False

    def _checked(self, kept) -> None:
        self._checking = None
        waiting, self._waiting_checks = self._waiting_checks, []
        for d in waiting:
            d.callback(kept is True and not self.is_lost)

    def _fenced(self, failure) -> None:
        if failure.check(txredisapi().ResponseError) and \
                str(failure.value).startswith("FENCED"):
            self.lease_checked()

    def _lose(self) -> None:
        if not self.is_lost:
            self.is_lost = True
            self._lost()


class _Patience:
    """Waits for nodes to say they are done. A dead node never will, and is
    given up on; a live one will, however late Redis takes its writes, and
    giving up on it would let what it gives back land after newer messages.
    So the wait ends once none of the nodes' leases lives (or once it has
    lasted as long as a socket stays among the leaving)."""

    def __init__(self, reactor, holds_up: Callable[[str, str | None], Awaitable[bool]],
                 waits: Callable[[], set[tuple[str, str | None]] | None],
                 give_up: Callable[[], None]) -> None:
        self._reactor = reactor
        self._holds_up = holds_up
        self._waits = waits
        self._give_up = give_up
        self._told = False
        self._until = reactor.seconds() + LEAVING_MAX
        self._timer = reactor.callLater(LEAVING_TIMEOUT, self._check)

    def cancel(self) -> None:
        """Not left pending for seconds after the wait ended: one per connect."""
        if self._timer.active():
            self._timer.cancel()

    def _check(self) -> None:
        defer.ensureDeferred(self._decide()).addErrback(
            lambda f: log.failure("Could not decide whether to wait on", f))

    async def _decide(self) -> None:
        waits = self._waits()
        if waits is None:
            return
        try:
            live = sorted({node for node, socket in waits
                           if await self._holds_up(node, socket)})
        except (RedisUnavailable, txredisapi().ResponseError):
            live = sorted({node for node, _ in waits})  # Redis cannot say: as if alive
        if self._waits() is None:
            return
        if not live:
            self._give_up()
            return
        if self._reactor.seconds() >= self._until:
            log.warn("Node(s) {nodes} did not say they were done within {max:g} s; "
                     "waiting no more", nodes=live, max=LEAVING_MAX)
            self._give_up()
            return
        if not self._told:
            self._told = True
            log.info("Still waiting for node(s) {nodes}, alive, to say they are done: "
                     "Redis takes their writes late", nodes=live)
        self._timer = self._reactor.callLater(LEAVING_TIMEOUT, self._check)


def _cancelling(result, patience: _Patience):
    """Pass ``result`` on, cancelling ``patience``."""
    patience.cancel()
    return result
