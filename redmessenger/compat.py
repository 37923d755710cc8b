"""Every place RedMessenger relies on the internals of Autobahn, txredisapi
or Twisted, each with what it works around.

No other module touches their private attributes. A release may rename any
of them: tests/test_compat.py checks each one against the installed
libraries and names the one that moved; setup.cfg caps each library at the
minor versions that were tested.

Importing this costs nothing the package does not import anyway: Autobahn,
but not txredisapi, which installs the global reactor when imported and so
is imported only once a service builds its first Redis connection.
"""

from __future__ import annotations

import functools
from pprint import pformat
from types import ModuleType

from autobahn import util as autobahn_util
from autobahn.twisted import websocket as autobahn_twisted
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import PreparedMessage
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper

# -- Autobahn -----------------------------------------------------------------


class ServerProtocol(WebSocketServerProtocol):
    """Autobahn's server protocol, with what RedMessenger needs of it and
    Autobahn offers no public way to do."""

    def send_text(self, frame: bytes) -> None:
        """``sendMessage(frame)`` at a fifth of its cost, for every message
        frame: Autobahn's ``sendData()`` formats the arguments of a debug
        log line on every call, logged or not, and its public
        ``sendPreparedMessage()`` goes through ``sendData()`` too (timeit, a
        300-byte frame, Autobahn 26.11: 1.0 µs here, 5.2 µs through
        ``sendPreparedMessage()``, 5.5 µs through ``sendMessage()``)."""
        # The single unmasked frame sendMessage() would write; not when
        # compression was negotiated (the frame differs), nor while
        # Autobahn has bytes queued (this one would overtake them).
        if self._perMessageCompress is None and not self.send_queue:
            self.transport.write(PreparedMessage(frame, False, False, True).payloadHybi)
        else:
            self.sendMessage(frame)

    def send_close(self, code: int, reason: str) -> None:
        """Start the closing handshake with ``code``: Autobahn's
        ``sendClose()`` allows only 1000 and 3000-4999, and RedMessenger
        closes with 1001, 1003 and 1013 too. The reason is cut to the 123
        bytes a close frame holds."""
        self.sendCloseFrame(code, reason.encode("utf-8")[:123])

    def hold_message_to(self, limit: int) -> None:
        """From ``onMessageFrameBegin``: fail the connection with 1009
        (through ``message_too_big``) once the frames of the message being
        received add up to more than ``limit`` bytes. Autobahn's own message
        limit cannot be used: it would cap what we send too."""
        size = self.message_data_total_length
        if not self.failedByMe and size > limit:
            self._max_message_size_exceeded(
                size,
                limit,
                f"received WebSocket message of {size} bytes exceeds the limit of {limit}",
            )

    def message_too_big(self, size: int, limit: int, reason: str) -> str:
        """Called before a frame or message of ``size`` bytes, over
        ``limit``, closes the connection with 1009; returns the reason its
        close frame gives."""
        return reason

    def _max_message_size_exceeded(self, msg_size, max_msg_size, reason) -> None:
        # Autobahn's hook for a frame over maxFramePayloadSize (and for a
        # message over hold_message_to's limit): message_too_big first.
        super()._max_message_size_exceeded(
            msg_size, max_msg_size, self.message_too_big(msg_size, max_msg_size, reason)
        )

    #: Set by ``onConnect`` when it has logged why it raises
    #: ``ConnectionDeny``.
    denial_logged = False

    def failHandshake(self, reason: str, code: int = 400, responseHeaders=None) -> None:
        """A denial ``onConnect`` logged is not logged twice more: Autobahn
        logs one as it fails the handshake and one as it drops the
        connection, through the protocol's ``log``, for which a silent
        logger of the instance's own stands in meanwhile."""
        if not self.denial_logged:
            super().failHandshake(reason, code, responseHeaders)
            return
        self.log = _SILENT
        try:
            super().failHandshake(reason, code, responseHeaders)
        finally:
            del self.log

    def follow_backpressure(self, producer: IPushProducer, high_water: int) -> None:
        """Register ``producer`` for the socket, paused past ``high_water``
        unsent bytes. The socket was HTTP's until the upgrade, and Twisted
        has no public way to set a transport's high-water mark: it is the
        socket's ``bufferSize``. Under a TLS layer it is the socket's too:
        the layer passes the socket's pause on to its producer (and reads of
        ``bufferSize`` through to the socket, but not writes)."""
        self.transport.unregisterProducer()
        set_high_water(self.transport, high_water)
        self.transport.registerProducer(producer, True)


def set_high_water(transport, high_water: int) -> None:
    """Pause ``transport``'s producer past ``high_water`` unsent bytes (an
    event stream's, which twisted.web registered). Twisted has no public
    way to: it is the socket's ``bufferSize``, read at each write, also
    through the wrappers above it (TLS, admission's doorway)."""
    socket = transport
    while isinstance(socket, ProtocolWrapper):
        socket = socket.transport
    if hasattr(socket, "bufferSize"):
        socket.bufferSize = high_water


_SILENT = Logger(observer=lambda event: None)


class _Lazy:
    """What one of Autobahn's debug lines gets instead of a string:
    ``function(*args)``, formatted only if a debug observer renders it."""

    __slots__ = ("_function", "_args", "_kwargs")

    def __init__(self, function, args: tuple, kwargs: dict) -> None:
        self._function = function
        self._args = args
        self._kwargs = kwargs

    def __str__(self) -> str:
        return self._function(*self._args, **self._kwargs)

    __repr__ = __format__ = lambda self, *spec: str(self)  # noqa: E731


def _deferred(function):
    return functools.wraps(function)(lambda *args, **kwargs: _Lazy(function, args, kwargs))


def defer_autobahn_debug_formatting() -> None:
    """Autobahn formats the fields of its debug lines whether or not
    anything logs them: ~30 options pretty-printed on every new connection
    (90 µs of a ~600 µs connect+hello), and ``hltype()``/``hlval()``
    (``inspect`` and ``click`` styling) seven times per connect and hello and
    on every read. Make them lazy; the debug lines themselves are unchanged.

    It replaces ``pformat``, ``hltype`` and ``hlval`` in Autobahn's
    WebSocket modules, for every Autobahn server and client in the process:
    so it is done by ``RedMessengerService.startService``, not by building
    a factory, and ``str()`` of Autobahn's ``Timings`` (which an application
    may track with ``trackTimings``), the one other caller that must return
    a string, keeps the real ``pformat``. Calling it again changes nothing."""
    autobahn_protocol.pformat = _LAZY_PFORMAT
    autobahn_protocol.Timings.__str__ = _timings_str
    for module in (autobahn_protocol, autobahn_twisted):
        module.hltype = _LAZY_HLTYPE
        module.hlval = _LAZY_HLVAL


_LAZY_PFORMAT = _deferred(pformat)
_LAZY_HLTYPE = _deferred(autobahn_util.hltype)
_LAZY_HLVAL = _deferred(autobahn_util.hlval)


def _timings_str(timings: autobahn_protocol.Timings) -> str:
    return pformat({key: timings[key] for key in timings})


# -- Twisted ------------------------------------------------------------------


def cap_accepts_per_turn(port, most: int) -> None:
    """Twisted's TCP port accepts up to ``numberAccepts`` connections per
    turn of the reactor, and adds 20 each time it accepted that many: in a
    reconnect storm it grows into the thousands, and the next turn then
    takes all their handshakes at once, for a second or more in which no
    timer runs, the lease's renewal included (a node taking a dead node's
    clients came near to counting as dead itself). Keep it at ``most``: the
    rest wait in the listen backlog for the next turn. A port without it
    (not TCP) is left alone."""
    if not hasattr(port, "numberAccepts"):
        return
    accept = port.doRead

    def doRead():
        port.numberAccepts = min(port.numberAccepts, most)
        return accept()

    port.doRead = doRead


def cap_events_per_turn(reactor, most: int) -> None:
    """Twisted's epoll reactor asks ``epoll_wait`` for as many events as it
    has sockets and handles them all in one turn, before any timer: 10,000
    sockets closed at once made one turn of 2.4 s. Ask for ``most`` at a
    time (the sockets still ready come in the next turns: epoll is level
    triggered, and it hands out ready sockets in turn). Another reactor is
    left alone."""
    poller = getattr(reactor, "_poller", None)
    if poller is None or not hasattr(poller, "poll") or isinstance(poller, _CappedPoller):
        return
    reactor._poller = _CappedPoller(poller, most)


class _CappedPoller:
    """An ``epoll`` object whose ``poll`` returns at most ``most`` events."""

    __slots__ = ("_poller", "_most")

    def __init__(self, poller, most: int) -> None:
        self._poller = poller
        self._most = most

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list:
        if maxevents < 1 or maxevents > self._most:
            maxevents = self._most
        return self._poller.poll(timeout, maxevents)

    def __getattr__(self, name: str):
        return getattr(self._poller, name)


# -- txredisapi ---------------------------------------------------------------


@functools.cache
def txredisapi() -> ModuleType:
    """txredisapi imports (and so installs) the global reactor: import it
    only once a service starts, so an application can pick its reactor."""
    import txredisapi

    return txredisapi


@functools.cache
def bytes_protocol(base: type) -> type:
    """``base``, a txredisapi protocol, speaking bytes only (``charset=None``,
    ``convertNumbers=False``, as all of ours do) without txredisapi's
    per-element Python work: replies are hiredis' own values, commands are
    packed by hiredis in C. It also keeps why its connection was lost."""
    import hiredis

    class BytesProtocol(base):
        #: Why the connection was lost; set by our own setup too.
        lost_reason = None

        def tryConvertData(self, data):
            # txredisapi's hook for every reply: it rebuilds the reply
            # element by element, to decode and convert what bytes-only
            # settings leave as it is.
            return data

        def _build_command(self, *args, **kwargs) -> bytes:
            # txredisapi packs each command in Python, argument by argument.
            return hiredis.pack_command(args)

        def connectionLost(self, reason):
            # txredisapi's whenDisconnected() fires with the protocol, not
            # the reason: kept so a connection that dies during setup (TLS,
            # AUTH) can say why, unless the setup already said.
            if self.lost_reason is None:
                self.lost_reason = reason
            return super().connectionLost(reason)

    BytesProtocol.__name__ = base.__name__
    return BytesProtocol
