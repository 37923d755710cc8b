"""Every connection from its accept, before it is HTTP or a WebSocket: it
counts against ``--max-connections`` and ``--max-connections-per-address``
until it closes, and it has ``--handshake-timeout`` seconds to become a
WebSocket (TLS handshake, HTTP request and upgrade), so that clients that
open connections and trickle bytes into them cannot hold the server's places.

Its first request says where a connection goes: a WebSocket upgrade of
``/`` straight to Autobahn, anything else to twisted.web. A WebSocket never
meets twisted.web, whose request parsing and resource rendering cost more
than the rest of a connect and hello together.
"""

from __future__ import annotations

import re

from autobahn.twisted.util import peer2str
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.http import HTTPChannel
from twisted.web.server import NOT_DONE_YET
from zope.interface import directlyProvides, providedBy

from .limits import Limits, address_of
from .stats import Stats

log = Logger()

#: A request head that has not ended by then goes to twisted.web, which
#: refuses it as too large.
_MAX_HEAD = HTTPChannel.totalHeadersSize
#: A header line twisted.web would take as it is (no folding, a token name).
_HEADER = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:.*")


def asks_for_websocket(head: bytes) -> bool:
    """A ``GET / HTTP/1.1`` head, whole and plain, with ``Upgrade:
    websocket``: what twisted.web would have handed to Autobahn. Anything
    unusual goes to twisted.web, which still upgrades it (``upgrade``) or
    refuses it as before."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return False
    request, *headers = head[:end].split(b"\r\n")
    parts = request.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1":
        return False
    if parts[1].partition(b"?")[0] != b"/":
        return False
    upgrade = None
    for line in headers:
        if not _HEADER.fullmatch(line):
            return False
        name, _, value = line.partition(b":")
        if name.lower() == b"upgrade":
            upgrade = value.strip().lower()
    return upgrade == b"websocket"


class _Doorway(ProtocolWrapper):
    """One accepted connection. A WebSocket gets the transport itself and
    this only sees the connection close; for HTTP this is the channel's
    transport, to tell a slow request from an idle keep-alive connection."""

    factory: Admission

    #: The address counted against the limits; None if refused.
    _address: str | None = None
    _deadline = None
    #: What was seen last is our answer, not the peer's bytes: an idle HTTP
    #: keep-alive connection, not a slow request.
    _answered = False
    #: The first request's head, until it is whole.
    _head = b""

    def __init__(self, factory: Admission, upgrading: bool = False) -> None:
        # What it wraps is known once the first request's head is in.
        super().__init__(factory, None)
        #: Handed over by another site's twisted.web (``Mounted``), from
        #: its upgrade request on: a WebSocket.
        self._upgrading = upgrading

    def logPrefix(self) -> str:
        # Twisted asks every new connection (ProtocolWrapper's answer
        # names what it wraps, here nothing yet).
        return "RedMessenger"

    def makeConnection(self, transport) -> None:
        address = address_of(transport.getPeer())
        refusal = self.factory.limits.admit(address)
        # What the transport is (a push producer, above all): so twisted.web
        # follows its back-pressure, as ProtocolWrapper.makeConnection does.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        if refusal is not None:
            self._refuse(transport, refusal)
            return
        self._address = address
        self.factory.waiting.add(self)
        self._deadline = self.factory.reactor.callLater(self.factory.timeout, self._too_late)

    def _refuse(self, transport, refusal: str) -> None:
        """Closed at once. A plain connection is told why (HTTP 503, as
        nginx's ``limit_conn`` answers); a TLS one is not, as that would
        first take a TLS handshake, which is what a flood wants us to spend."""
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

    def dataReceived(self, data: bytes) -> None:
        if self._address is None:
            return  # refused: what it sends does not matter
        self._answered = False
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._upgrading:
            self.to_websocket(data)
            return
        head = self._head + data
        if b"\n\r\n" not in head and b"\n\n" not in head and len(head) <= _MAX_HEAD:
            self._head = head
            return
        self._head = b""
        if asks_for_websocket(head):
            self.to_websocket(head)
        else:
            self.wrappedProtocol = self.factory.site.buildProtocol(self.transport.getPeer())
            self.wrappedProtocol.makeConnection(self)
            self.wrappedProtocol.dataReceived(head)

    def to_websocket(self, request: bytes) -> None:
        """Hand the connection to a WebSocket protocol, from its upgrade
        ``request`` on: it writes to the transport, and what comes in goes
        straight to it. The handshake deadline ends once it is open; the
        hello timeout takes over."""
        websocket = self.factory.websocket.buildProtocol(self.transport.getPeer())
        self.wrappedProtocol = websocket
        self.dataReceived = websocket.dataReceived  # out of the way
        websocket.makeConnection(self.transport)
        websocket.dataReceived(request)
        if websocket.state == websocket.STATE_OPEN:
            self._end_handshake()

    def streaming(self) -> None:
        """It carries an event stream (events.py): a client's connection
        now, as a WebSocket is, with no handshake deadline."""
        self._end_handshake()

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
            self.factory.waiting.discard(self)

    def _too_late(self) -> None:
        self._end_handshake()
        if self._answered:
            log.debug("Closing the idle HTTP connection {peer}", peer=peer2str(self.transport))
        else:
            self.factory.stats.handshake_timeouts += 1
            log.warn("Closing {peer}: no WebSocket within {timeout:g} s of its accept",
                     peer=peer2str(self.transport), timeout=self.factory.timeout)
        self.transport.abortConnection()

    def write(self, data: bytes) -> None:
        self._answered = True
        super().write(data)

    def writeSequence(self, data) -> None:
        self._answered = True
        super().writeSequence(data)

    def connectionLost(self, reason) -> None:
        if self._address is None:
            return
        self.factory.limits.release(self._address)
        self._address = None
        self._end_handshake()
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)


class Admission(ServerFactory):
    """What listens: a ``_Doorway`` per connection, in front of the HTTP
    ``site`` and the ``websocket`` factory."""

    protocol = _Doorway
    noisy = False

    def __init__(self, site, websocket, limits: Limits, stats: Stats, timeout: float,
                 reactor) -> None:
        self.site = site
        self.websocket = websocket
        self.limits = limits
        self.stats = stats
        self.timeout = timeout
        self.reactor = reactor
        #: Connections admitted that are not WebSockets (yet): HTTP requests,
        #: upgrades on their way, idle keep-alive connections.
        self.waiting: set[_Doorway] = set()

    @property
    def handshaking(self) -> int:
        return len(self.waiting)

    def buildProtocol(self, addr) -> _Doorway:
        return _Doorway(self)

    def startFactory(self) -> None:
        self.site.doStart()

    def stopFactory(self) -> None:
        """The port is closed (the service stops): connections that are not
        WebSockets yet go, rather than linger until their deadline. The
        WebSockets are the service's to close."""
        for doorway in list(self.waiting):
            doorway.abandon()
        self.site.doStop()


class Mounted:
    """The WebSocket of a twisted.web site that RedMessenger is mounted in
    (``RedMessengerService.resource()``). Autobahn's ``WebSocketResource``
    takes the connection over from the site's HTTP with what this builds: a
    doorway that counts it against the limits and gives it the handshake
    deadline, as on RedMessenger's own port, then hands it to a WebSocket."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def buildProtocol(self, addr) -> _Doorway:
        return _Doorway(self._admission, upgrading=True)


def stream_admitted(request, limits: Limits, stats: Stats) -> str | None:
    """An event stream's request. On RedMessenger's own port its doorway
    has counted the connection since its accept. In another application's
    site it is counted from now until the stream ends. ``None``, or the
    limit that refuses it (logged)."""
    if isinstance(request.channel.transport, _Doorway):
        return None
    address = address_of(request.getClientAddress())
    refusal = limits.admit(address)
    if refusal is None:
        request.notifyFinish().addBoth(lambda _: limits.release(address))
    else:
        stats.connections_refused += 1
        log.warn("Refusing {peer}: {reason}", peer=address, reason=refusal)
    return refusal


def stream_began(request) -> None:
    """The stream is answered (its key was good): on RedMessenger's own
    port, its connection has no handshake deadline from now on. A refused
    request keeps it, so a connection that only ever gets refusals is
    closed at its deadline."""
    doorway = request.channel.transport
    if isinstance(doorway, _Doorway):
        doorway.streaming()


def upgrade(request):
    """A WebSocket upgrade that came after other requests on its
    connection, so twisted.web has it: the connection is the WebSocket's
    from now on, from this request (as it came in) on."""
    channel = request.channel
    # The HTTP idle timeout must not close it later.
    channel.setTimeout(None)
    doorway, channel.transport = channel.transport, None
    head = [b"%s %s HTTP/1.1\r\n" % (request.method, request.uri)]
    head += [b"%s: %s\r\n" % (name, b",".join(values))
             for name, values in request.requestHeaders.getAllRawHeaders()]
    doorway.to_websocket(b"".join(head) + b"\r\n" + request.content.read())
    return NOT_DONE_YET
