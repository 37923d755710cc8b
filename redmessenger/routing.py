"""Which users a PUBLISH is for, and whether this node delivers, stores or
leaves it to another node, decided in publish order.

A group message needs a Redis round trip to learn its members; the messages
behind it wait for that answer, so no user ever sees a later message before
an earlier one, and no store overtakes another. The cluster's events (a
socket joining or leaving anywhere, a storer partition changing hands) wait
their turn the same way: each message is decided with the cluster as it
stood at that message's point of the stream (``presence``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from twisted.internet import defer
from twisted.logger import Logger

from .delivery import Dispatcher
from .envelope import Envelope
from .keys import Namespace
from .presence import ClusterView, owner_of

log = Logger()


class Groups(Protocol):
    def members(self, gid: str) -> defer.Deferred:
        """Fires with the group's member ids, each once, in order."""


class _Pending:
    """A message whose recipients are not known yet (``uids`` is None), or
    an event to apply in its turn (``apply``; ``uids`` is None until it may
    be applied: a new storer waits for the old one's last stores)."""

    __slots__ = ("envelope", "uids", "apply")

    def __init__(self, envelope: Envelope | None, uids: list[str] | None,
                 apply: Callable[[], None] | None = None) -> None:
        self.envelope = envelope
        self.uids = uids
        self.apply = apply


class Router:
    """Turns each message from the subscriber into an envelope and its
    recipients, and hands them to the dispatcher in arrival order."""

    def __init__(self, dispatcher: Dispatcher, groups: Groups, namespace: Namespace, *,
                 view: ClusterView | None = None, trace: bool = False,
                 clock: Callable[[], float] = time.time,
                 wait_on: Callable[[str, Callable[[], set[tuple[str, str | None]] | None],
                                    Callable[[], None]], object] | None = None) -> None:
        """``wait_on(uid, waits, give_up)``: how to wait for a node that may
        never say it is done, for it died (``Membership.wait_on``)."""
        self._dispatcher = dispatcher
        #: Alone, a node stores for every user (partition 0 of 1).
        if view is None:
            view = ClusterView("", 1)
            view.held.add(0)
        self._view = view
        #: Partitions taken from a stopping node, waiting for its last
        #: stores: partition -> the pending entry that holds the stream.
        self._handovers: dict[int, _Pending] = {}
        #: What waits, per user, for another node's last stores (see
        #: ``ClusterView.parking``): envelopes to decide, and sockets to
        #: fence, in the order heard.
        self._parked: dict[str, list[Envelope | str]] = {}
        self._wait_on = wait_on
        self._fence_now = view.fence
        view.fence = self._fence_in_order
        view.parking = self._parking
        view.unparking = self._unparking
        self._groups = groups
        self._ns = namespace
        self._trace = trace
        self._clock = clock
        self._waiting: deque[_Pending] = deque()
        self._stats = dispatcher.stats

    def received_message(self, channel: bytes, payload: bytes,
                         pattern: bytes | None = None) -> None:
        """``pattern``: which pattern it was heard on (``None``: a channel)."""
        try:
            name = channel.decode("utf-8")
        except UnicodeDecodeError:
            self._stats.received += 1
            log.error("Ignoring a message on channel {channel!r}: a channel name that is "
                      "not UTF-8 names no user who could ever connect", channel=channel)
            return
        target = self._ns.parse_channel(name)
        if target is None:
            control = self._ns.parse_control(name)
            if control is None:
                self._stats.received += 1
                log.warn("Ignoring a message on channel {channel}: not ours", channel=name)
            else:
                self._control(*control, payload, pattern)
            return
        kind, ident = target
        # A partition stored here is heard through its pattern, any other
        # user through its channel: while a node has both (it just took the
        # partition), the other copy is skipped.
        if kind == "users" and (pattern is None) == self._view.holds(ident):
            return
        self._stats.received += 1
        if self._trace:
            log.debug("New message from channel {channel}", channel=name)
        if kind == "users" and not self._waiting and not self._ours(ident):
            # Most of what a storer hears: no envelope to make for it.
            self._stats.elsewhere += 1
            return
        now = self._clock()
        envelope = Envelope(self._dispatcher.ids(), name, int(now * 1000), payload,
                            received=now)
        if kind == "users":
            if not self._waiting:
                self._decide((ident,), envelope)
                return
            pending = _Pending(envelope, [ident])
            self._waiting.append(pending)
        else:
            pending = _Pending(envelope, None)
            self._waiting.append(pending)
            d = self._groups.members(ident)
            d.addCallback(self._resolved, pending)
            d.addErrback(self._unresolved, pending, ident)

    def _ours(self, uid: str) -> bool:
        view = self._view
        return ((view.holds(uid) or uid in view.mine)
                and not (uid in view.others and not self._dispatcher.has_sockets(uid)))

    def _decide(self, uids, envelope: Envelope) -> None:
        """Deliver to (or store for) the recipients that are this node's at
        this point: those with a socket here, and, in a partition stored
        here, those with no socket anywhere. One whose sockets are all on
        other nodes is theirs."""
        ours = [uid for uid in uids if self._ours(uid)]
        if self._parked:
            for uid in [uid for uid in ours if uid in self._parked]:
                self._parked[uid].append(envelope)
                ours.remove(uid)
        if len(ours) < len(uids):
            self._stats.elsewhere += len(uids) - len(ours)
        if ours:
            self._dispatcher.deliver(ours, envelope)

    def _control(self, kind: str, ident: str, payload: bytes, pattern: bytes | None) -> None:
        """An event of the cluster, applied at its point of the stream."""
        view = self._view
        if kind == "presence":
            if (pattern is None) == view.holds(ident):
                return  # the other copy (see received_message)
            apply = lambda: view.heard_presence(ident, payload)  # noqa: E731
        elif kind == "node":
            if ident != view.owner or not payload.startswith(b"S "):
                return
            apply = lambda: self._took(payload)  # noqa: E731
        elif payload.startswith(b"D "):
            # A handover's end opens the stream held behind it: not queued.
            self.handed_over(int(payload.split(b" ")[1]))
            return
        else:
            apply = lambda: self._view.heard_cluster(payload)  # noqa: E731
        if not self._waiting:
            apply()
        else:
            self._waiting.append(_Pending(None, [], apply))

    def _took(self, payload: bytes) -> None:
        """This node decides for a partition from here. Handed over by a
        node that is stopping, it waits for that node's last stores: what
        comes next waits until the node says they are in Redis (``D``), or
        ``handed_over`` gives up on it."""
        partition, handed = self._view.took(payload[2:])
        if handed:
            gate = self._handovers[partition] = _Pending(None, None, lambda: None)
            self._waiting.appendleft(gate)

    def _parking(self, uid: str, socket: str) -> None:
        self._parked.setdefault(uid, [])
        if self._wait_on is not None:
            view = self._view
            self._wait_on(uid, lambda: {(owner_of(socket), socket)}
                          if view.parked_on(uid, socket) else None,
                          lambda: view.gone(uid, socket))

    def _unparking(self, uid: str) -> None:
        """In the order heard: a parked fence goes out after the stores of
        the messages parked before it."""
        for item in self._parked.pop(uid, ()):
            if isinstance(item, str):
                self._fence_now(uid, item)
            else:
                self._decide((uid,), item)

    def _fence_in_order(self, uid: str, socket: str) -> None:
        if uid in self._parked:
            self._parked[uid].append(socket)
        else:
            self._fence_now(uid, socket)

    def handed_over(self, partition: int) -> None:
        """The node that handed the partition over is done (or gone)."""
        gate = self._handovers.pop(partition, None)
        if gate is not None:
            gate.uids = []
            self._pump()

    def _resolved(self, uids: list[str], pending: _Pending) -> None:
        if not uids:
            log.warn("Group {channel} has no members: message {id} reaches nobody",
                     channel=pending.envelope.source, id=pending.envelope.id)
        pending.uids = uids
        self._pump()

    def _unresolved(self, failure, pending: _Pending, gid: str) -> None:
        log.error("Could not read the members of group {gid} ({key}): {why}; message {id} "
                  "({size} bytes) reaches nobody", gid=gid, key=self._ns.members(gid),
                  why=failure.getErrorMessage()[:300], id=pending.envelope.id,
                  size=len(pending.envelope.stored()))
        pending.uids = []
        self._pump()

    def _pump(self) -> None:
        waiting = self._waiting
        while waiting and waiting[0].uids is not None:
            pending = waiting.popleft()
            if pending.apply is not None:
                pending.apply()
            elif pending.uids:
                self._decide(pending.uids, pending.envelope)
