"""Which users a PUBLISH is for, decided in publish order.

A group message needs a Redis round trip to learn its members; the messages
behind it wait for that answer, so no user ever sees a later message before
an earlier one, and no store overtakes another.
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

log = Logger()


class Groups(Protocol):
    def members(self, gid: str) -> defer.Deferred:
        """Fires with the group's member ids, each once, in order."""


class _Pending:
    __slots__ = ("envelope", "uids")

    def __init__(self, envelope: Envelope, uids: list[str] | None) -> None:
        self.envelope = envelope
        self.uids = uids


class Router:
    """Turns each message from the subscriber into an envelope and its
    recipients, and hands them to the dispatcher in arrival order."""

    def __init__(self, dispatcher: Dispatcher, groups: Groups, namespace: Namespace, *,
                 trace: bool = False, clock: Callable[[], float] = time.time) -> None:
        self._dispatcher = dispatcher
        self._groups = groups
        self._ns = namespace
        self._trace = trace
        self._clock = clock
        self._waiting: deque[_Pending] = deque()
        self._settling: list[tuple[_Pending, defer.Deferred]] = []
        self._stats = dispatcher.stats

    def received_message(self, channel: bytes, payload: bytes,
                         message_id: str | None = None) -> None:
        """``message_id``: a source that may hand over the same message again
        (the inbox stream) gives it the same id each time."""
        self._stats.received += 1
        try:
            name = channel.decode("utf-8")
        except UnicodeDecodeError:
            log.error("Ignoring a message on channel {channel!r}: a channel name that is "
                      "not UTF-8 names no user who could ever connect", channel=channel)
            return
        target = self._ns.parse_channel(name)
        if target is None:
            log.warn("Ignoring a message on channel {channel}: not ours", channel=name)
            return
        if self._trace:
            log.debug("New message from channel {channel}", channel=name)
        now = self._clock()
        envelope = Envelope(message_id or self._dispatcher.ids(), name, int(now * 1000), payload,
                            received=now)
        kind, ident = target
        if kind == "users":
            if not self._waiting:
                self._dispatcher.deliver((ident,), envelope)
                return
            pending = _Pending(envelope, [ident])
            self._waiting.append(pending)
        else:
            pending = _Pending(envelope, None)
            self._waiting.append(pending)
            d = self._groups.members(ident)
            d.addCallback(self._resolved, pending)
            d.addErrback(self._unresolved, pending, ident)

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
            if pending.uids:
                self._dispatcher.deliver(pending.uids, pending.envelope)
            while self._settling and self._settling[0][0] is pending:
                self._settling.pop(0)[1].callback(None)

    def settled(self) -> defer.Deferred:
        """Fires once every message received so far has been handed to the
        dispatcher (group messages wait for their members) and has left its
        memory (``Dispatcher.written``)."""
        if not self._waiting:
            return self._dispatcher.written()
        d = defer.Deferred()
        self._settling.append((self._waiting[-1], d))
        return d.addCallback(lambda _: self._dispatcher.written())
