"""The Redis pub/sub side: the channels and patterns this node listens to,
subscribed again after every reconnect, and each message handed on as it
arrives.

What a node listens to changes as it runs: the group pattern, its own and
the cluster's channels always; the user and presence patterns of the
storer partitions it holds; and the user and presence channels of each
user with a socket here (reference-counted, and unsubscribed a moment after
the last one, so that a reconnect does not cost two round trips).

txredisapi matches each subscription reply to the command waiting longest,
and drops one nobody waits for: a command naming several channels gets a
reply per channel, which would answer the commands after it too early. So
each command here names one channel or pattern."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from .compat import txredisapi
from .keys import Namespace
from .redisconnection import (
    ProtocolFactory,
    connect_service,
    lost_reason,
    name_connection,
)
from .settings import RedisAddress

log = Logger()


#: Seconds a channel nobody here needs stays subscribed.
UNSUBSCRIBE_DELAY = 1.0


@functools.cache
def _subscriber_protocol() -> type:
    class SubscriberProtocol(txredisapi().SubscriberProtocol):
        on_message: Callable[[bytes, bytes, bytes | None], None]

        def messageReceived(self, pattern, channel, message):
            try:
                self.on_message(channel, message, pattern)
            except Exception:
                # One message's bug must not cost the subscription.
                log.failure("Handling a message on {channel!r} failed", channel=channel)

    return SubscriberProtocol


class Subscriber(Service):
    def __init__(self, address: RedisAddress, namespace: Namespace, reactor,
                 channels: Sequence[bytes] = ()) -> None:
        self.address = address
        self._patterns: dict[bytes, None] = {namespace.groups_pattern: None}
        #: Channels, with how many want each (0: to be unsubscribed soon).
        self._channels: dict[bytes, int] = dict.fromkeys(channels, 1)
        #: Called with each message: ``(channel, payload, pattern)``.
        self.on_message: Callable[[bytes, bytes, bytes | None], None] = \
            lambda channel, payload, pattern: None
        #: Called once every subscription is confirmed on a new connection,
        #: before the subscriber says it is subscribed; a Deferred it
        #: returns is waited for. ``True`` on a reconnect: what was
        #: published meanwhile was not heard.
        self.prepare: Callable[[bool], object] = lambda again: None
        self._reactor = reactor
        self._client = None
        self._waiters: list[defer.Deferred] = []
        #: True between a confirmed PSUBSCRIBE and the loss of that connection.
        self.subscribed = False
        self.reconnects = 0
        self._connections = 0
        #: True while reading is paused (``pause``).
        self.paused = False
        self._proto = None

    def startService(self) -> None:
        super().startService()
        factory = ProtocolFactory(self.address, _subscriber_protocol(),
                                  on_message=self.on_message)
        self._client = connect_service(self._reactor, self.address, factory, self._ready)
        self._client.startService()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self.subscribed = False
        return self._client.stopService()

    def whenSubscribed(self) -> defer.Deferred:
        """Fires once the first PSUBSCRIBE is confirmed."""
        if self.subscribed:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def pause(self, paused: bool) -> None:
        """Stop (or go on) reading messages: Redis keeps what is published
        meanwhile in its output buffer for us, within its
        ``client-output-buffer-limit pubsub``."""
        self.paused = paused
        if self._proto is not None and self._proto.transport is not None:
            if paused:
                self._proto.transport.pauseProducing()
            else:
                self._proto.transport.resumeProducing()

    def psubscribe(self, patterns: Sequence[bytes]) -> defer.Deferred:
        """Fires once Redis has confirmed every pattern (at once if there is
        no connection: they are subscribed with the others on connecting)."""
        for pattern in patterns:
            self._patterns[pattern] = None
        return self._each(b"PSUBSCRIBE", patterns)

    def punsubscribe(self, patterns: Sequence[bytes]) -> None:
        for pattern in patterns:
            self._patterns.pop(pattern, None)
        self._each(b"PUNSUBSCRIBE", patterns)

    def follow(self, channels: Sequence[bytes]) -> defer.Deferred:
        """Subscribe (once however many follow them); fires once Redis has
        confirmed, or at once if they already were."""
        new = []
        for channel in channels:
            count = self._channels.get(channel)
            if count is None:
                new.append(channel)
            self._channels[channel] = (count or 0) + 1
        return self._each(b"SUBSCRIBE", new)

    def unfollow(self, channels: Sequence[bytes]) -> None:
        """One fewer wants them: the last one unsubscribes a moment later."""
        for channel in channels:
            count = self._channels.get(channel)
            if count is None:
                continue
            self._channels[channel] = count - 1
            if count == 1:
                self._reactor.callLater(UNSUBSCRIBE_DELAY, self._unsubscribe, channel)

    def _unsubscribe(self, channel: bytes) -> None:
        if self._channels.get(channel) == 0:
            del self._channels[channel]
            self._each(b"UNSUBSCRIBE", [channel])

    def _each(self, verb: bytes, names: Sequence[bytes]) -> defer.Deferred:
        proto = self._proto
        if not names:
            return defer.succeed(None)
        if proto is None:
            return self.whenSubscribed()  # subscribed with the others on connecting
        sent = [proto.execute_command(verb, name) for name in names]
        for d in sent:
            d.addErrback(lambda f: None)  # a lost connection subscribes all again
        return sent[-1].addCallback(lambda _: None)

    @defer.inlineCallbacks
    def _ready(self, proto):
        proto.whenDisconnected().addCallback(lambda _: self._lost(proto))
        self._proto = proto
        if self.paused:
            proto.transport.pauseProducing()
        if self._connections:
            self.reconnects += 1
        self._connections += 1
        name_connection(proto, "subscriber")
        sent = [proto.execute_command(verb, name)
                for verb, names in ((b"PSUBSCRIBE", self._patterns), (b"SUBSCRIBE",
                                                                       self._channels))
                for name in list(names)]
        for d in sent[1:]:
            d.addErrback(lambda f: None)  # the first refusal says it for all
        try:
            for d in sent[:1]:
                yield d
            yield defer.DeferredList(sent[1:])
        except txredisapi().ConnectionError:
            return  # logged by _lost, with its reason
        except Exception as e:
            log.error("Redis at {address} refused PSUBSCRIBE {patterns}: {why} (an ACL "
                      "user needs these channel patterns granted literally); trying "
                      "again", address=str(self.address),
                      patterns=[p.decode(errors="replace")[:40] for p in self._patterns],
                      why=str(e))
            proto.transport.loseConnection()  # and ClientService tries again, backing off
            return
        if proto.transport is None or self._proto is not proto:
            return  # lost meanwhile
        try:
            yield self.prepare(self._connections > 1)
        except Exception:
            if self.running:  # else: stopping, and whatever it was no longer matters
                log.failure("Could not get ready after subscribing; subscribing again")
                proto.transport.loseConnection()
            return
        if proto.transport is None or self._proto is not proto:
            return
        self.subscribed = True
        log.info("Subscribed to {patterns} on Redis at {address}",
                 patterns=sorted(p.decode(errors="replace")[:40] for p in self._patterns),
                 address=str(self.address))
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _lost(self, proto) -> None:
        if self._proto is proto:
            self._proto = None
        self.subscribed = False
        if self.running:
            log.warn("Lost the subscriber connection to Redis at {address} ({why}); "
                     "resubscribing once it is back (messages published meanwhile "
                     "are not seen)", address=str(self.address), why=lost_reason(proto))
