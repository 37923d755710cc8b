"""Deliver or store: who is online here, and what happens to every message.

This is the one place that knows which users have sockets in this process
and decides, per message, between sending it and storing it. It does no I/O
of its own: sockets and the Redis queues are handed in behind the two small
interfaces below, and the cluster (other nodes holding sockets of the same
users) behind a third, ``Presence``. What each ack-mode socket holds
unacknowledged is kept in ``acks``.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from twisted.internet import defer
from twisted.logger import Logger

from .acks import Acks, Claim, Outstanding, Ref, Seat
from .envelope import Envelope, MessageIds
from .frames import Close
from .keys import Namespace
from .stats import Stats

log = Logger()


class Socket(Protocol):
    """What the dispatcher needs of one identified WebSocket."""

    uid: str
    ack_mode: bool
    peer: str
    #: False while the connection holds more unsent bytes than its high-water
    #: mark: nothing more is written to it then, unless another socket of the
    #: user can take the message (see ``missed``). ``Dispatcher.writable``
    #: is told when it may take more again.
    writable: bool

    def start(self, queued: int) -> None:
        """Tell the client it is live and how many stored messages follow."""

    def send(self, frame: bytes) -> bool:
        """Hand a frame to the connection; ``False`` if it is no longer open,
        or (not writable) already too far behind: it is then closed (4010)."""

    def missed(self, size: int) -> None:
        """A message of ``size`` bytes went to Redis because this socket was
        not writable: it counts towards --max-socket-buffer as if written."""

    def close(self, code: int, error: str, reason: str) -> None:
        """Send an error frame, then close."""


class MessageStore(Protocol):
    """The per-user queues in Redis. Every call is retried across Redis
    outages until it is done; only a Redis error reply fails it."""

    def store(self, uids: Sequence[str], envelope: Envelope) -> None:
        """Append to the tail of each user's queue, after everything handed
        over before. What Redis refuses, the store logs with its envelope."""

    def requeue(self, uid: str, envelopes: Sequence[Envelope]) -> defer.Deferred:
        """Put back at the head of the queue, keeping their order."""

    def take(self, uid: str, count: int) -> defer.Deferred:
        """Atomically remove up to ``count`` from the head: fires with a
        ``Taken`` (raw entries, number left, claim). Safe to repeat if its
        reply is lost."""

    def hold(self, uid: str, envelopes: Sequence[Envelope]) -> defer.Deferred:
        """Claim live messages in Redis as a take would have, without going
        through the queue: fires with a ``Taken`` holding no raw entries
        (the caller has the envelopes). Safe to repeat if its reply is lost."""

    def trim(self, taken, keep: int) -> None:
        """Keep only the last ``keep`` messages of a take's claim: the ones
        before are settled, and must not come back after a crash. Idempotent
        (an absolute count), so it is safe to send again."""

    def release(self, taken) -> defer.Deferred:
        """Forget what a ``take`` or ``hold`` kept in case its reply was lost."""

    def flushed(self) -> defer.Deferred:
        """Fires when every write handed over so far is in Redis."""


class Presence(Protocol):
    """The cluster's record of every user's sockets (``membership``)."""

    def socket_id(self) -> str:
        """A new socket's id, unique in the cluster."""

    def join(self, uid: str, socket: str) -> defer.Deferred:
        """Record the socket; fires once this process delivers to the user
        and may drain its queue (or fails: the socket cannot be served)."""

    def leave(self, uid: str, socket: str, returned: defer.Deferred | None = None) -> None:
        """The socket is gone, and what it held is on its way back to Redis:
        said after it, on the same connection. ``returned``: what it held
        goes back once this fires (a drain under way gives it back when it
        ends); whoever joins the user meanwhile waits for that."""


class _Alone:
    """The ``Presence`` of a process with no cluster (unit tests)."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    def socket_id(self) -> str:
        return f"-:{next(self._ids)}"

    def join(self, uid: str, socket: str) -> defer.Deferred:
        return defer.succeed(None)

    def leave(self, uid: str, socket: str, returned: defer.Deferred | None = None) -> None:
        pass


class _Session:
    """One user's presence here: sockets oldest first, and whether stored
    messages are being drained (live ones wait behind them meanwhile).

    Its states, as they stand whenever the dispatcher has returned::

        state     seats  draining  may also hold
        --------  -----  --------  ---------------------------------------------
        live      1+     no        overflowed, refused
        draining  1+     yes       waiting, returned, unsent, window, overflowed,
                                   refused, drained; remaining is None until the
                                   first take answers, and sockets that joined
                                   before it are not welcomed (``started``)
                                   until then
        left      0      yes       returned, unsent, overflowed, drained
        gone      0      no        (no session: it is deleted)

    So, whatever the state:

    - ``waiting``, ``returned``, ``unsent``, ``window`` and ``drained`` are
      empty (None) outside a drain, and ``remaining`` is known;
    - ``waiting`` is empty while ``overflowed`` (newer messages follow the
      older ones into Redis) and while no socket is here;
    - ``window`` (a drain paused until an ack) and ``refused`` need a
      socket: an arrival or a departure fires ``window``, and any change
      of sockets clears ``refused``;
    - a plain seat holds nothing unacknowledged; an ack-mode seat holds at
      most --ack-window, tags ascending below its ``next_tag``; a message's
      ``holders`` is how many seats hold it, and what is ``returned`` is
      held by none and not yet done.

    What moves it:

    - gone -> draining: a socket joins (``attach``);
    - live -> draining: what overflowed into Redis is drained once a socket
      can take more (``ack``, ``writable``), or live messages for an
      ack-mode socket are claimed first (``deliver``);
    - draining -> live: the drain ends (``_drain_done``), unless what came
      meanwhile starts the next one;
    - draining -> left, live -> gone: the last socket leaves (``detach``);
    - left -> draining: a socket joins before the drain ends (``attach``);
    - left -> gone: the drain ends.

    (tests/test_delivery_unit.py checks all of this after every step of
    its random walks.)
    """

    __slots__ = (
        "uid",
        "seats",
        "draining",
        "waiting",
        "returned",
        "unsent",
        "remaining",
        "sent",
        "overflowed",
        "refused",
        "window",
        "outbid",
        "drained",
    )

    def __init__(self, uid: str) -> None:
        self.uid = uid
        self.seats: list[Seat] = []
        self.draining = False
        #: Live messages that arrived during the drain, in order.
        self.waiting: deque[Envelope] = deque()
        #: While a drain's take is in flight: what a departed socket left
        #: unacknowledged, and then the drained messages (with their claim)
        #: no socket would take; both go before whatever that take brings.
        self.returned: list[Outstanding] = []
        self.unsent: list[tuple[Envelope, Ref]] = []
        #: How many messages were sent so far: ``Outstanding.seq``.
        self.sent = 0
        #: Live messages were stored because every socket's ack window was
        #: full; later ones follow them into the queue until a drain.
        self.overflowed = False
        #: No socket would take a message (they are closing): no new drain
        #: until the sockets change.
        self.refused = False
        #: Fires when an ack (or a departure) may have opened a window.
        self.window: defer.Deferred | None = None
        #: Stored messages still to come in this drain (for late welcomes);
        #: unknown until the drain's first take has answered.
        self.remaining: int | None = None
        #: The user's newest socket is on another node: none here bubbles.
        self.outbid = False
        #: Fires when the drain under way has ended and what the sockets
        #: gone meanwhile held is on its way back (``Presence.leave``).
        self.drained: defer.Deferred | None = None


class Dispatcher:
    """Who is online here, and deliver-or-store for every message."""

    def __init__(
        self,
        store: MessageStore,
        namespace: Namespace,
        *,
        max_sockets_per_user: int = 8,
        drain_chunk: int = 500,
        ack_window: int = 1000,
        trace: bool = False,
        clock: Callable[[], float] = time.time,
        ids: MessageIds | None = None,
        stats: Stats | None = None,
        presence: Presence | None = None,
    ) -> None:
        self._store = store
        self._presence = presence or _Alone()
        #: Every socket here, by its id in the cluster.
        self._by_id: dict[str, Socket] = {}
        self._ns = namespace
        self._max_sockets = max_sockets_per_user
        self._chunk = drain_chunk
        self._window = ack_window
        self._trace = trace
        self._clock = clock
        self.stats = stats or Stats()
        self.ids = ids or MessageIds()
        self._sessions: dict[str, _Session] = {}
        self._seats: dict[Socket, Seat] = {}
        self._drains: set[defer.Deferred] = set()
        #: Requeues whose claims are released once Redis has answered them.
        self._recommits: set[defer.Deferred] = set()
        self._acks = Acks(store, self.stats)
        # Bound once: called per message.
        self._settled = self._acks.settled
        self.stopping = False

    # -- who is online ---------------------------------------------------

    @property
    def users(self) -> int:
        """Users with at least one socket here (``/health``, ``/metrics``)."""
        return sum(1 for s in self._sessions.values() if s.seats)

    def has_sockets(self, uid: str) -> bool:
        session = self._sessions.get(uid)
        return session is not None and bool(session.seats)

    def outbid(self, uid: str, elsewhere: bool) -> None:
        """Whether the user's newest socket, which bubbles, is on another node."""
        session = self._sessions.get(uid)
        if session is not None:
            session.outbid = elsewhere

    def wake(self, uid: str) -> None:
        """Something was stored for the user to be drained now: drain it to
        the sockets here, after what they are getting (or once they can
        take more)."""
        session = self._sessions.get(uid)
        if session is None or not session.seats:
            return  # it waits in the queue for the user's next socket
        session.overflowed = True  # newer live messages follow it through the queue
        self._may_go_on(session)

    def evict(self, socket_id: str) -> None:
        """A socket pushed out by a newer one of its user on another node
        (--max-sockets-per-user holds cluster-wide)."""
        socket = self._by_id.get(socket_id)
        if socket is None:
            return
        log.info("{uid} has more than {max} sockets, closing the oldest ({peer}), pushed "
                 "out by a newer one on another node", uid=socket.uid, max=self._max_sockets,
                 peer=socket.peer)
        self.detach(socket)
        socket.close(Close.TOO_MANY_SOCKETS, "too_many_sockets",
                     f"more than {self._max_sockets} sockets for this user; this one was "
                     "the oldest")

    def attach(self, socket: Socket) -> None:
        """An authenticated socket joins its user: it is live from now on,
        and what was stored for the user is drained to it first."""
        if self.stopping:
            socket.close(Close.GOING_AWAY, "shutting_down", "the server is shutting down")
            return
        session = self._sessions.get(socket.uid)
        if session is not None and len(session.seats) >= self._max_sockets:
            oldest = session.seats[0].socket
            log.info(
                "{uid} has more than {max} sockets, closing the oldest ({peer})",
                uid=socket.uid,
                max=self._max_sockets,
                peer=oldest.peer,
            )
            self.detach(oldest)  # which may end the session
            oldest.close(
                Close.TOO_MANY_SOCKETS,
                "too_many_sockets",
                f"more than {self._max_sockets} sockets for this user; this one was the oldest",
            )
            session = self._sessions.get(socket.uid)
        if session is None:
            session = self._sessions[socket.uid] = _Session(socket.uid)
        seat = self._seats[socket] = Seat(socket, self._presence.socket_id())
        self._by_id[seat.id] = socket
        session.seats.append(seat)
        session.refused = False
        log.info("Assigning id {uid} to socket {peer}.", uid=socket.uid, peer=socket.peer)
        ready = self._presence.join(socket.uid, seat.id)
        ready.addErrback(self._not_joined, socket)
        if socket not in self._seats:
            return  # refused at once
        if session.draining:
            if session.remaining is not None:
                self._start(seat, session.remaining)
            self._window_may_open(session)  # a drain paused on full windows: room here
        else:
            self._begin_drain(session, ready=ready)

    def _not_joined(self, failure, socket: Socket) -> None:
        """The cluster could not record the socket: it cannot be served here."""
        self.detach(socket)
        socket.close(Close.TRY_AGAIN_LATER, "cluster_unavailable",
                     "this server cannot take the socket now; try again later")

    def detach(self, socket: Socket) -> None:
        """A socket is gone: what it held undelivered goes to the user's other
        sockets, else back to the head of the queue. Safe to call twice."""
        seat = self._seats.pop(socket, None)
        if seat is None:
            return
        del self._by_id[seat.id]
        session = self._sessions[socket.uid]
        session.seats.remove(seat)
        session.refused = False
        orphans = seat.leave()
        if orphans:
            if session.draining:
                session.returned.extend(orphans)
            else:
                if session.seats:
                    log.info(
                        "{uid}: socket {peer} left {count} unacknowledged messages, "
                        "sending them to the user's other sockets",
                        uid=session.uid,
                        peer=socket.peer,
                        count=len(orphans),
                    )
                self.stats.redelivered += self._hand_over(
                    session, [(o.envelope, o.claim) for o in orphans]
                )
        if not session.seats:
            self._store_waiting(session)
            if not session.draining:
                del self._sessions[session.uid]
        # Said after what the socket held went back to Redis: a node that
        # hears it leave and drains the user next finds all of it there.
        # During a drain, what it held goes back when the drain ends: its
        # leave is said now all the same (the user may be back on another
        # node at once, which must not count it as open), and the node
        # joined meanwhile waits for the drain's end.
        if session.draining:
            if session.drained is None:
                session.drained = defer.Deferred()
            self._presence.leave(socket.uid, seat.id, session.drained)
        else:
            self._presence.leave(socket.uid, seat.id)
        self._window_may_open(session)  # a paused drain finds out it is alone

    def ack(self, socket: Socket, tag: int) -> None:
        """The client has every message up to ``tag``."""
        seat = self._seats.get(socket)
        if seat is None:
            return
        self._acks.ack(seat, tag)
        self._may_go_on(self._sessions[socket.uid])

    def writable(self, socket: Socket) -> None:
        """The socket has written out what it held: it may take more."""
        if socket in self._seats:
            self._may_go_on(self._sessions[socket.uid])

    def _may_go_on(self, session: _Session) -> None:
        """An ack or an emptied socket may have unblocked the user: a paused
        drain goes on, and what overflowed into the queue meanwhile is
        drained."""
        self._window_may_open(session)
        if session.overflowed and not session.draining and not self._blocked(session):
            session.overflowed = False
            self._begin_drain(session)  # the overflow waits in the queue

    def _blocked(self, session: _Session) -> bool:
        """True when no socket of the user may take another message now:
        each one is above its high-water mark (back-pressure) or in ack
        mode with --ack-window messages unacknowledged."""
        window = self._window
        return all(
            not seat.socket.writable or (seat.socket.ack_mode and len(seat.unacked) >= window)
            for seat in session.seats
        )

    def _window_may_open(self, session: _Session) -> None:
        waiter, session.window = session.window, None
        if waiter is not None:
            waiter.callback(None)

    # -- deliver or store ------------------------------------------------

    def deliver(self, uids: Iterable[str], envelope: Envelope) -> None:
        """Send to every recipient online here; store for the others, in one
        Redis call for all of them."""
        offline = []
        kick = []
        for uid in uids:
            session = self._sessions.get(uid)
            if session is None:
                offline.append(uid)
            elif not session.seats:  # gone, its drain still in flight
                session.overflowed = True  # whoever comes next drains it first
                offline.append(uid)
            elif session.draining and not session.overflowed:
                session.waiting.append(envelope)
            elif session.overflowed or self._blocked(session):
                session.overflowed = True
                offline.append(uid)
                for seat in session.seats:
                    if not seat.socket.writable:
                        seat.socket.missed(len(envelope.stored()))
            elif self._durable(session):
                session.waiting.append(envelope)  # claimed in Redis, then sent
                kick.append(session)
            elif not self._send(session, envelope):
                offline.append(uid)
            else:
                self._delivered_live(envelope)
                if self._trace:
                    log.debug(
                        "{uid}: Sending message {id} from {source}",
                        uid=uid,
                        id=envelope.id,
                        source=envelope.source,
                    )
        if offline:
            if self._trace:
                for uid in offline:
                    log.debug(
                        "Client is not online, queueing message in Redis ({key})",
                        key=self._ns.queue(uid),
                    )
            self._store.store(offline, envelope)
        for session in kick:  # after the stores: the claim comes behind them
            if not session.draining:
                self._begin_drain(session, held=True)

    def _delivered_live(self, envelope: Envelope) -> None:
        stats = self.stats
        stats.delivered_live += 1
        if stats.delivered_live & 15 == 1:  # one in 16 is plenty for a histogram
            stats.observe_latency(self._clock() - envelope.received)

    @staticmethod
    def _durable(session: _Session) -> bool:
        """A user with an ack-mode socket gets live messages through Redis
        too: claimed there first, as a drain's take is, until an ack
        releases them, so a process killed meanwhile loses none of them."""
        return any(seat.socket.ack_mode for seat in session.seats)

    def _send(self, session: _Session, envelope: Envelope, claim: Ref = None) -> bool:
        """Send to all of the user's sockets, the newest one bubbling; true
        if at least one connection took it. A drained message's claim is
        settled now if a plain socket took it, else when it is acked."""
        taken_plain = False
        outstanding = None
        newest = None if session.outbid else session.seats[-1]
        session.sent += 1
        for seat in session.seats:
            bubble = seat is newest
            if not seat.socket.ack_mode:
                taken_plain = seat.socket.send(envelope.frame(bubble)) or taken_plain
                continue
            if len(seat.unacked) >= self._window:
                continue  # this one gets no more until it acks
            tag = seat.next_tag
            if seat.socket.send(envelope.frame(bubble, tag)):
                if outstanding is None:
                    outstanding = Outstanding(envelope, session.sent, claim)
                seat.next_tag += 1
                seat.unacked[tag] = outstanding
                outstanding.holders += 1
        if outstanding is not None and taken_plain:
            outstanding.done = True
        if taken_plain:
            self._settled(claim)
        return taken_plain or outstanding is not None

    def _recommit(self, session: _Session, items: list[tuple[Envelope, Ref]]) -> None:
        """Back to the head of the queue; only once Redis has them there may
        their claims go, so that no moment holds them nowhere, not even when
        Redis refuses the requeue. Newer messages follow them through the
        queue until a drain has taken them (``overflowed``), or they would
        pass them."""
        session.overflowed = True
        uid = session.uid
        envelopes = [envelope for envelope, _ in items]
        self.stats.recommitted += len(envelopes)
        log.info(
            "{uid}: Client is no longer online, recommitting {count} messages to the head of {key}",
            uid=uid,
            count=len(envelopes),
            key=self._ns.queue(uid),
        )
        d = self._store.requeue(uid, envelopes)
        self._recommits.add(d)
        d.addCallbacks(
            self._recommitted,
            self._not_recommitted,
            callbackArgs=(items,),
            errbackArgs=(uid, envelopes),
        )
        d.addBoth(lambda _: self._recommits.discard(d))

    def _recommitted(self, _, items: list[tuple[Envelope, Ref]]) -> None:
        for _, ref in items:
            self._settled(ref)

    @staticmethod
    def _not_recommitted(failure, uid: str, envelopes: list[Envelope]) -> None:
        """Their claims stay in Redis: they come back when this process is
        gone (its heartbeat expires), rather than never."""
        log.failure(
            "Could not recommit {count} messages for {uid} (ids {first} to {last}); "
            "they stay claimed",
            failure,
            count=len(envelopes),
            uid=uid,
            first=envelopes[0].id,
            last=envelopes[-1].id,
        )

    # -- drain -------------------------------------------------------------

    def _start(self, seat: Seat, queued: int) -> None:
        seat.started = True
        seat.socket.start(queued)

    def _begin_drain(self, session: _Session, held: bool = False,
                     ready: defer.Deferred | None = None) -> None:
        """Drain the queue, or with ``held`` the live messages waiting (for
        a user with an ack-mode socket): the same story, except that they
        are claimed in Redis straight from memory, not stored and taken.
        A user's first drain here waits until it is ``ready``: what other
        nodes stored for it is in the queue (see ``Presence.join``)."""
        session.draining = True
        session.remaining = None
        envelopes = list(session.waiting) if held else []
        session.waiting.clear()
        d = defer.ensureDeferred(self._drain(session, envelopes, ready))  # claims them now
        self._drains.add(d)
        d.addBoth(self._drain_done, session, d)

    async def _drain(self, session: _Session, held: list[Envelope],
                     ready: defer.Deferred | None = None) -> None:
        """Take the queue chunk by chunk, asking for the next chunk before
        sending this one, so Redis and the sockets work at the same time."""
        uid = session.uid
        if ready is not None and not ready.called:
            await ready
            if not session.seats:
                return  # gone before it could begin: nothing to drain for nobody
        taking = self._store.hold(uid, held) if held else self._store.take(uid, self._chunk)
        while taking is not None:
            try:
                taken = await taking
            except BaseException:
                session.waiting.extendleft(reversed(held))  # theirs to store still
                raise
            taking = self._store.take(uid, self._chunk) if taken.left and session.seats else None
            if session.remaining is None and taken.items:
                log.info(
                    "{channel} has {count} messages enqueued, purging!",
                    channel=self._ns.user_channel(uid),
                    count=len(taken.items) + taken.left,
                )
            session.remaining = len(taken.items) + taken.left
            for seat in session.seats:
                if not seat.started:
                    self._start(seat, session.remaining)
            orphans, unsent = self._returned(session)
            now_ms = int(self._clock() * 1000)
            claim = Claim(taken, len(held) + len(taken.items))
            channel = self._ns.user_channel(uid)
            items = (
                orphans
                + unsent
                + [
                    (envelope, (claim, i))
                    for i, envelope in enumerate(
                        held
                        or (
                            Envelope.from_stored(raw, channel, self.ids, now_ms)
                            for raw in taken.items
                        )
                    )
                ]
            )
            live, held = bool(held), []
            resend = len(orphans)  # the first ones were sent before
            while True:
                sent = self._hand_over(session, items, hold=taking is not None, wait=True)
                again = min(sent, resend)
                self.stats.redelivered += again
                if live:
                    for envelope, _ in items[again:sent]:
                        self._delivered_live(envelope)
                else:
                    self.stats.drained += sent - again
                items, resend = items[sent:], resend - again
                if not items or not session.seats or not self._blocked(session):
                    break
                session.window = defer.Deferred()  # paused until an ack
                # Which may take the client any time: what would wait in
                # memory meanwhile waits in Redis instead, in order.
                session.overflowed = True
                self._store_waiting(session)
                await session.window
                # A socket that left meanwhile gave back what it had not
                # acknowledged: sent before anything left here, it goes first.
                late = self._orphans(session)
                items, resend = late + items, resend + len(late)
            session.remaining = taken.left

    @staticmethod
    def _orphans(session: _Session) -> list[tuple[Envelope, Ref]]:
        """What departed sockets left unacknowledged, in the order it was sent."""
        orphans = [(o.envelope, o.claim) for o in sorted(session.returned, key=lambda o: o.seq)]
        session.returned = []
        return orphans

    def _returned(
        self, session: _Session
    ) -> tuple[list[tuple[Envelope, Ref]], list[tuple[Envelope, Ref]]]:
        """What waits to go before the next take's messages, in send order."""
        unsent, session.unsent = session.unsent, []
        return self._orphans(session), unsent

    def _hand_over(
        self,
        session: _Session,
        items: list[tuple[Envelope, Ref]],
        hold: bool = False,
        wait: bool = False,
    ) -> int:
        """Send stored or returned messages in order; if the user is gone, put
        the rest back at the head of the queue (or, with ``hold``, keep them
        to go before the take in flight). When every ack window is full,
        stop there (``wait``: the caller waits for an ack) or put the rest
        back and drain them once acks come. How many were sent."""
        for index, (envelope, claim) in enumerate(items):
            if session.seats and self._blocked(session):
                if not wait:
                    self._recommit(session, items[index:])
                return index
            if not session.seats or not self._send(session, envelope, claim):
                session.refused = bool(session.seats)
                if hold:
                    session.unsent = items[index:]
                else:
                    self._recommit(session, items[index:])
                return index
            if self._trace:
                log.debug(
                    "{uid}: Purging message {id} from {source}",
                    uid=session.uid,
                    id=envelope.id,
                    source=envelope.source,
                )
        return len(items)

    def _drain_done(self, result, session: _Session, d: defer.Deferred) -> None:
        self._drains.discard(d)
        session.draining = False
        if isinstance(result, defer.Failure):
            log.failure("Could not drain the stored messages of {uid}", result, uid=session.uid)
            for seat in session.seats:
                if not seat.started:
                    self._start(seat, 0)
        orphans, unsent = self._returned(session)
        if orphans or unsent:
            sent = self._hand_over(session, orphans + unsent)
            self.stats.redelivered += min(sent, len(orphans))
        # What the sockets gone meanwhile held is on its way back to Redis
        # (or with the others): whoever waits for them may drain after it.
        drained, session.drained = session.drained, None
        if drained is not None:
            drained.callback(None)
        waiting = session.waiting
        durable = self._durable(session)
        if (
            waiting
            and durable
            and session.seats
            and not session.overflowed
            and not self._blocked(session)
            and not isinstance(result, defer.Failure)
        ):
            self._begin_drain(session, held=True)  # what came meanwhile, claimed next
            return
        while (
            waiting
            and session.seats
            and not session.overflowed
            and not durable
            and not self._blocked(session)
            and self._send(session, waiting[0])
        ):
            self._delivered_live(waiting.popleft())
        self._store_waiting(session)  # what cannot go now waits in Redis, in order
        if not session.seats:
            del self._sessions[session.uid]
        elif session.overflowed and not session.refused and not self._blocked(session):
            # Acks came while this drain ran: take what overflowed meanwhile.
            session.overflowed = False
            self._begin_drain(session)

    def _store_waiting(self, session: _Session) -> None:
        """Live messages held behind a drain that no socket can take now go to
        the tail of the queue, after everything stored before them."""
        if not session.waiting:
            return
        waiting = list(session.waiting)
        session.waiting.clear()
        session.overflowed = True  # later ones follow them, until a drain takes them
        if not session.seats:
            log.info(
                "{uid}: Client is not online, queueing {count} messages in Redis ({key})",
                uid=session.uid,
                count=len(waiting),
                key=self._ns.queue(session.uid),
            )
        elif self._trace:  # ack mode or a full window: the everyday way, not news
            log.debug(
                "{uid}: queueing {count} messages in Redis ({key}) until acked",
                uid=session.uid,
                count=len(waiting),
                key=self._ns.queue(session.uid),
            )
        for envelope in waiting:
            self._store.store([session.uid], envelope)

    # -- stopping --------------------------------------------------------

    def stop(self) -> defer.Deferred:
        """Give everything undelivered back to Redis; fires when it is there."""
        self.stopping = True
        for socket in list(self._seats):
            self.detach(socket)
        # A plain Deferred, so a caller that stops waiting can cancel it
        # (a DeferredList that has fired ignores cancel()).
        done: defer.Deferred = defer.Deferred()
        defer.DeferredList(list(self._drains)).addCallback(
            lambda _: defer.DeferredList(list(self._recommits))
        ).addCallback(lambda _: self._store.flushed()).chainDeferred(done)
        return done
