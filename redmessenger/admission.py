"""Every connection from its accept, before it is HTTP or a WebSocket: it
counts against ``--max-connections`` and ``--max-connections-per-address``
until it closes, and it has ``--handshake-timeout`` seconds to become a
WebSocket (TLS handshake, HTTP request and upgrade), so that clients that
open connections and trickle bytes into them cannot hold the server's places.
"""

from __future__ import annotations

from autobahn.twisted.util import peer2str
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.resource import Resource

from .limits import Limits, address_of
from .stats import Stats

log = Logger()


class _Guard(ProtocolWrapper):
    """One accepted connection: the transport of its HTTP channel; once it
    is a WebSocket, it only hands the bytes that come in on and sees the
    connection close (see ``upgraded``)."""

    factory: Admission

    #: The address counted against the limits; None if refused.
    _address: str | None = None
    _deadline = None
    #: What was seen last is our answer, not the peer's bytes: an idle HTTP
    #: keep-alive connection, not a slow request.
    _answered = False

    def makeConnection(self, transport) -> None:
        address = address_of(transport.getPeer())
        refusal = self.factory.limits.admit(address)
        if refusal is not None:
            self._refuse(transport, refusal)
            return
        self._address = address
        self.factory.handshaking += 1
        self._deadline = self.factory.reactor.callLater(self.factory.timeout, self._too_late)
        super().makeConnection(transport)

    def _refuse(self, transport, refusal: str) -> None:
        """Closed at once. A plain connection is told why (HTTP 503, as
        nginx's ``limit_conn`` answers); a TLS one is not, as that would
        first take a TLS handshake, which is what a flood wants us to spend."""
        Protocol.makeConnection(self, transport)
        self.factory.stats.connections_refused += 1
        log.warn("Refusing {peer}: {reason}", peer=peer2str(transport), reason=refusal)
        if isinstance(transport, TLSMemoryBIOProtocol):
            transport.abortConnection()
            return
        body = f"{refusal}\n".encode()
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\n"
                        b"Content-Type: text/plain; charset=utf-8\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        transport.loseConnection()

    def upgraded(self) -> None:
        """A WebSocket now: the hello timeout takes over from the deadline,
        and it still counts against the limits until it closes. Autobahn
        put the WebSocket right onto the transport under this one (TLS needs
        that), as that transport's protocol (TLS) or as ours (TCP): this
        stays in between for what comes in, to see the connection close."""
        self._end_handshake()
        under = self.transport
        if isinstance(under, ProtocolWrapper) and under.wrappedProtocol is not self:
            self.wrappedProtocol, under.wrappedProtocol = under.wrappedProtocol, self
        self.dataReceived = self.wrappedProtocol.dataReceived  # out of the way

    def abandon(self) -> None:
        """Closed if it is not a WebSocket yet: nothing listens any more."""
        if self._deadline is not None:
            self._end_handshake()
            self.transport.abortConnection()

    def _end_handshake(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
            self.factory.handshaking -= 1

    def _too_late(self) -> None:
        self._end_handshake()
        if self._answered:
            log.debug("Closing the idle HTTP connection {peer}", peer=peer2str(self))
        else:
            self.factory.stats.handshake_timeouts += 1
            log.warn("Closing {peer}: no WebSocket within {timeout:g} s of its accept",
                     peer=peer2str(self), timeout=self.factory.timeout)
        self.transport.abortConnection()

    def write(self, data: bytes) -> None:
        self._answered = True
        super().write(data)

    def writeSequence(self, data) -> None:
        self._answered = True
        super().writeSequence(data)

    def dataReceived(self, data: bytes) -> None:
        if self._address is None:
            return  # refused: what it sends does not matter
        self._answered = False
        super().dataReceived(data)

    def connectionLost(self, reason) -> None:
        if self._address is None:
            return
        self.factory.limits.release(self._address)
        self._address = None
        self._end_handshake()
        super().connectionLost(reason)


class Admission(WrappingFactory):
    """What listens: the HTTP site behind a ``_Guard`` per connection."""

    protocol = _Guard
    noisy = False

    def __init__(self, site, limits: Limits, stats: Stats, timeout: float, reactor) -> None:
        super().__init__(site)
        self.limits = limits
        self.stats = stats
        self.timeout = timeout
        self.reactor = reactor
        #: Connections admitted that are not WebSockets (yet): HTTP requests,
        #: upgrades on their way, idle keep-alive connections.
        self.handshaking = 0

    def stopFactory(self) -> None:
        """The port is closed (the service stops): connections that are not
        WebSockets yet go, rather than linger until their deadline. The
        WebSockets are the service's to close."""
        for guard in list(self.protocols):
            guard.abandon()


def upgrade(request, websocket: Resource):
    """Render an upgrade request with ``websocket`` (Autobahn's resource),
    which takes the connection over: it gets the transport under the guard."""
    guard = request.channel.transport
    if not isinstance(guard, _Guard):
        return websocket.render(request)
    request.channel.transport = guard.transport
    answer = websocket.render(request)
    if request.channel.transport is None:
        guard.upgraded()
    else:
        request.channel.transport = guard
    return answer
