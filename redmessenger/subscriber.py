"""The Redis pub/sub side: ``PSUBSCRIBE`` to the user and group channels, and
again after every reconnect, handing each message on as it arrives."""

from __future__ import annotations

import functools
from collections.abc import Callable

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


@functools.cache
def _subscriber_protocol() -> type:
    class SubscriberProtocol(txredisapi().SubscriberProtocol):
        on_message: Callable[[bytes, bytes], None]

        def messageReceived(self, pattern, channel, message):
            try:
                self.on_message(channel, message)
            except Exception:
                # One message's bug must not cost the subscription.
                log.failure("Handling a message on {channel!r} failed", channel=channel)

    return SubscriberProtocol


class Subscriber(Service):
    def __init__(self, address: RedisAddress, namespace: Namespace,
                 on_message: Callable[[bytes, bytes], None], reactor) -> None:
        self.address = address
        self._patterns = namespace.patterns
        self._on_message = on_message
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
                                  on_message=self._on_message)
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
        try:
            yield proto.psubscribe(list(self._patterns))
        except txredisapi().ConnectionError:
            return  # logged by _lost, with its reason
        except Exception as e:
            log.error("Redis at {address} refused PSUBSCRIBE {patterns}: {why} (an ACL "
                      "user needs these channel patterns granted literally); trying "
                      "again", address=str(self.address),
                      patterns=[p.decode() for p in self._patterns], why=str(e))
            proto.transport.loseConnection()  # and ClientService tries again, backing off
            return
        self.subscribed = True
        log.info("Subscribed to {patterns} on Redis at {address}",
                 patterns=[p.decode() for p in self._patterns], address=str(self.address))
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
