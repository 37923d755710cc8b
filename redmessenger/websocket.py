"""The WebSocket side: one Autobahn protocol per client, from hello to close.

A socket waits for a hello, has its key checked, and is then handed to the
dispatcher; every refusal is an ``error`` frame followed by a close code that
says why (docs/protocol.rst).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from autobahn.twisted.websocket import ConnectionDeny, WebSocketServerFactory
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from . import frames
from .auth import Authenticator
from .compat import ServerProtocol
from .delivery import Dispatcher
from .frames import Close, Hello, ProtocolError
from .keys import Namespace
from .limits import Limits, address_of
from .pacing import HIGH_WATER, Paced
from .redisconnection import RedisUnavailable
from .settings import Settings

log = Logger()

#: Seconds a client has to answer our close frame.
CLOSE_TIMEOUT = 5.0


class RedMessengerProtocol(Paced, ServerProtocol):
    factory: RedMessengerFactory

    uid: str | None = None
    ack_mode = False
    _hello: Hello | None = None
    _hello_timer = None
    #: The remote address, for the hello rate.
    _address: str | None = None
    _next_ping = None
    _pong_due = None
    #: Welcomed, and its hello asked for heartbeat frames.
    _heartbeat = False

    # Our own pings rather than Autobahn's autoPing*, whose timers (txaio's)
    # misfire on Twisted's asyncio reactor.
    def _ping(self) -> None:
        self.sendPing()
        # A page cannot see pings: what it sees is this frame. A socket
        # that is not writable has bytes on their way to it already.
        if self._heartbeat and self.writable:
            self.send(frames.HEARTBEAT)
        self._pong_due = self.factory.reactor.callLater(self.factory.ping_timeout,
                                                        self._no_pong)

    def onPong(self, payload: bytes) -> None:
        if self._pong_due is not None and self._pong_due.active():
            self._pong_due.cancel()
            self._next_ping = self.factory.reactor.callLater(self.factory.ping_interval,
                                                             self._ping)

    def _no_pong(self) -> None:
        """A vanished peer (no FIN, no RST) would take messages into a dead
        connection until TCP gives up, minutes later: drop it now, so they
        are stored instead."""
        log.warn("{peer} ({uid}) did not answer a ping within {timeout:g} s: dropping it",
                 peer=self.peer, uid=self.uid, timeout=self.factory.ping_timeout)
        self.factory.dispatcher.stats.ping_timeouts += 1
        if self.uid is not None:
            self.factory.dispatcher.detach(self)
        self.dropConnection(abort=True)

    # -- Socket, as the dispatcher sees it ----------------------------------

    def start(self, queued: int) -> None:
        if self.factory.trace:  # at info, the dispatcher says who came and what follows
            log.debug("You're subscribed to {channel}! ({peer}, {queued} stored messages "
                      "follow)", channel=self.factory.namespace.user_channel(self.uid),
                      peer=self.peer, queued=queued)
        self._heartbeat = self._hello.heartbeat
        self.send_text(frames.welcome(
            self.uid, self.factory.namespace.user_channel(self.uid), queued, self.ack_mode,
            self.factory.ping_interval if self._heartbeat else None))

    def send(self, frame: bytes) -> bool:
        if self.state != self.STATE_OPEN or self._too_slow:
            return False
        if not self.writable and not self._fall_behind(len(frame)):
            return False
        self.send_text(frame)
        return True

    def close(self, code: int, error: str, reason: str) -> None:
        if self.state != self.STATE_OPEN:
            return
        self.factory.dispatcher.stats.closed_by_code[code] += 1
        log.info("Closing {peer} ({uid}) with {code}: {reason}", peer=self.peer,
                 uid=self.uid or self._claimed_id(), code=code, reason=reason)
        self.sendMessage(frames.error(error, reason))
        self.send_close(code, reason)

    # -- Autobahn's callbacks ------------------------------------------------

    def onConnect(self, request) -> None:
        # A page from elsewhere must not open a socket with the user's
        # cookies. Clients that send no Origin (not browsers) are not pages.
        origin = request.headers.get("origin")
        if origin is not None and not self.factory.origin_allowed(origin):
            log.warn("Refusing {peer}: origin {origin} is not allowed", peer=self.peer,
                     origin=origin)
            self.factory.dispatcher.stats.closed_by_code[403] += 1
            self.denial_logged = True
            raise ConnectionDeny(403, f"origin {origin} is not allowed")

    def onOpen(self) -> None:
        self.factory.connections.add(self)
        if self.factory.trace:
            log.debug("New connection {peer}! Waiting for ID...", peer=self.peer)
        # Counted against the connection limits since its accept (admission.py).
        self._address = address_of(self.transport.getPeer())
        self._hello_timer = self.factory.reactor.callLater(
            self.factory.hello_timeout, self._no_hello)
        if self.factory.ping_interval:
            self._next_ping = self.factory.reactor.callLater(self.factory.ping_interval,
                                                             self._ping)
        # The socket was HTTP's until the upgrade; its back-pressure is ours
        # to follow now.
        self.follow_backpressure(_Backpressure(self), HIGH_WATER)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            if isBinary:
                raise ProtocolError(Close.BINARY_FRAME, "binary_frame",
                                    "binary frames are not accepted; send JSON text")
            if self.uid is not None and self.ack_mode:
                self.factory.dispatcher.ack(self, frames.parse_ack(payload))
            elif self.uid is not None:
                raise ProtocolError(Close.BAD_FRAME, "bad_frame",
                                    "only ack-mode clients send frames after the hello")
            elif self._hello is not None:
                raise ProtocolError(Close.BAD_FRAME, "bad_frame",
                                    "wait for the welcome before sending more frames")
            else:
                self._received_hello(frames.parse_hello(payload))
        except ProtocolError as refusal:
            self._refuse(refusal)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.connections.discard(self)
        for call in (self._hello_timer, self._next_ping, self._pong_due):
            if call is not None and call.active():
                call.cancel()
        if self.uid is not None:
            self.factory.dispatcher.detach(self)
        log.info("Connection {peer} ({uid}) closed (code {code})", peer=self.peer,
                 uid=self.uid or self._claimed_id(), code=code)

    def onMessageFrameBegin(self, length: int) -> None:
        super().onMessageFrameBegin(length)
        # A message made of many frames is held to --max-frame too.
        self.hold_message_to(self.factory.max_frame)

    def message_too_big(self, size: int, limit: int, reason: str) -> str:
        # Say why before the connection is closed with 1009.
        log.warn("{peer}: {reason}", peer=self.peer, reason=reason)
        ours = f"frames are limited to {limit} bytes"
        self.factory.dispatcher.stats.closed_by_code[Close.FRAME_TOO_BIG] += 1
        self.sendMessage(frames.error("frame_too_big", ours))
        return ours

    # -- hello -------------------------------------------------------------

    def _claimed_id(self) -> str | None:
        return self._hello.id if self._hello else None

    def _no_hello(self) -> None:
        self._hello_timer = None
        self._refuse(ProtocolError(Close.HELLO_TIMEOUT, "hello_timeout",
                                   f"no hello within {self.factory.hello_timeout:g} s"))

    def _received_hello(self, hello: Hello) -> None:
        self._hello = hello
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        self._hello_timer = None
        d = self.factory.admit(hello, self._address, self.peer)
        d.addCallbacks(self._authenticated, self._not_authenticated)

    def _authenticated(self, _) -> None:
        if self.state != self.STATE_OPEN:
            return
        self.uid, self.ack_mode = self._hello.id, self._hello.ack
        self.factory.dispatcher.attach(self)

    def _not_authenticated(self, failure) -> None:
        failure.trap(ProtocolError)
        self._refuse(failure.value)

    def _refuse(self, refusal: ProtocolError) -> None:
        log.warn("Refusing {peer} ({uid}): {error}: {reason}", peer=self.peer,
                 uid=self.uid or self._claimed_id(), error=refusal.error,
                 reason=refusal.logged)
        self.close(refusal.close_code, refusal.error, refusal.reason)


@implementer(IPushProducer)
class _Backpressure:
    """Told by the transport when a socket's unsent bytes pass HIGH_WATER,
    and when it has written them all out."""

    def __init__(self, protocol: RedMessengerProtocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._protocol.paused()

    def resumeProducing(self) -> None:
        self._protocol.resumed()

    def stopProducing(self) -> None:
        pass


class RedMessengerFactory(WebSocketServerFactory):
    protocol = RedMessengerProtocol
    noisy = False

    def __init__(self, dispatcher: Dispatcher, authenticator: Authenticator,
                 settings: Settings, reactor, server: str,
                 redis_connected: Callable[[], bool],
                 recovered: Callable[[], defer.Deferred],
                 redis_overloaded: Callable[[], bool] = lambda: False) -> None:
        super().__init__(server=server)
        self.dispatcher = dispatcher
        self.redis_connected = redis_connected
        self.recovered = recovered
        self.redis_overloaded = redis_overloaded
        self.authenticator = authenticator
        self.namespace = Namespace(settings.prefix)
        self.hello_timeout = settings.hello_timeout
        #: --verbose: the steps of a connect are logged too (twistd logs
        #: debug lines; a line costs more than 10 % of a connect+hello).
        self.trace = settings.verbose
        self.max_frame = settings.max_frame
        self.allowed_origins = settings.allowed_origins
        self.limits = Limits(settings.max_connections, settings.max_connections_per_address,
                             settings.hello_rate, reactor.seconds)
        self.reactor = reactor
        #: Every client connection: WebSockets, and event streams (events.py).
        self.connections: set = set()
        # failByDrop=False: even Autobahn's own refusals (1009) close with a
        # closing handshake, so the client learns the code. A client gets
        # CLOSE_TIMEOUT seconds to answer a close before its TCP connection
        # is reset (Autobahn's 1 s can cut off a busy client's error frame).
        # Origins are checked in onConnect (Autobahn's check answers 400).
        # The handshake's deadline is --handshake-timeout, from the accept
        # (admission.py): no timer of Autobahn's per connection.
        self.setProtocolOptions(maxFramePayloadSize=settings.max_frame,
                                maxMessagePayloadSize=0, failByDrop=False,
                                closeHandshakeTimeout=CLOSE_TIMEOUT, allowNullOrigin=True,
                                openHandshakeTimeout=0)
        self.max_socket_buffer = settings.max_socket_buffer
        self.ping_interval = settings.ping_interval
        self.ping_timeout = settings.ping_timeout

    def admit(self, hello: Hello, address: str | None, peer: str) -> defer.Deferred:
        """Fires once ``hello`` may have its id here (a WebSocket's, or an
        event stream's request); fails with the ``ProtocolError`` that says
        why not. Each refusal that is not the client's doing is logged."""
        if self.dispatcher.stopping:
            return defer.fail(ProtocolError(Close.GOING_AWAY, "shutting_down",
                                            "the server is shutting down"))
        if not self.redis_connected():
            # Even with nothing to check, the welcome needs the stored queue.
            log.warn("Cannot take the hello of {peer} ({uid}): Redis is away",
                     peer=peer, uid=hello.id)
            return defer.fail(_redis_unavailable())
        if self.redis_overloaded():  # --max-pending-bytes; see RedisConnection
            return defer.fail(ProtocolError(Close.TRY_AGAIN_LATER, "redis_busy",
                                            "Redis is behind; try again later"))
        if not self.limits.hello_allowed(address):
            return defer.fail(ProtocolError(Close.RATE_LIMITED, "hello_rate",
                                            "too many hellos from this address; slow down"))
        # Right after a start, what dead processes held must be back in
        # the queues before this user's first take.
        d = self.recovered()
        d.addCallback(lambda _: self.authenticator.check(hello))
        d.addErrback(self._not_checked, hello, peer)
        return d

    @staticmethod
    def _not_checked(failure, hello: Hello, peer: str):
        if failure.check(ProtocolError):
            return failure
        if failure.check(RedisUnavailable):
            log.warn("Cannot check the hello of {peer} ({uid}): {why}", peer=peer,
                     uid=hello.id, why=failure.getErrorMessage())
            raise _redis_unavailable()
        log.failure("Checking the hello of {peer} ({uid}) failed", failure, peer=peer,
                    uid=hello.id)
        raise ProtocolError(Close.TRY_AGAIN_LATER, "server_error",
                            "could not check the key; try again later")

    def origin_allowed(self, origin: str) -> bool:
        return any(fnmatch.fnmatchcase(origin, pattern) for pattern in self.allowed_origins)

    def close_all(self, code: int, error: str, reason: str) -> None:
        for connection in list(self.connections):
            connection.close(code, error, reason)


def _redis_unavailable() -> ProtocolError:
    return ProtocolError(Close.TRY_AGAIN_LATER, "redis_unavailable",
                         "Redis is unavailable; try again later")
