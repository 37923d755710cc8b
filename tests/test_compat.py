"""What redmessenger/compat.py relies on in Autobahn, txredisapi and Twisted is
still there in the installed releases.

A release that renames one of them fails here, with the name, the library's
version and the workaround that needs it, rather than in production (where
an override of a renamed hook would just stop being called).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import pprint
import re
from collections import deque
from pathlib import Path

import pytest
from autobahn import util as autobahn_util
from autobahn.twisted import websocket as autobahn_twisted
from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.websocket import protocol as autobahn_protocol
from twisted.internet import abstract, tcp
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol

from redmessenger import compat
from redmessenger.compat import ServerProtocol

#: Every private attribute of another library that compat.py names, each
#: checked below (compat.py's own are not in it).
CHECKED_PRIVATES = {"_perMessageCompress", "_max_message_size_exceeded", "_build_command",
                    "_poller"}

#: The internals only compat.py may name.
INTERNALS = (
    "_perMessageCompress",
    "send_queue",
    "payloadHybi",
    "sendCloseFrame",
    "_max_message_size_exceeded",
    "failedByMe",
    "message_data_total_length",
    "bufferSize",
    "pformat",
    "hltype",
    "hlval",
    "tryConvertData",
    "_build_command",
    "numberAccepts",
    "_poller",
)


def gone(library: str, where: str, what: str) -> str:
    return (
        f"{library} {importlib.metadata.version(library)}: {where} is gone or changed; "
        f"redmessenger/compat.py relies on it for {what}"
    )


def relied_on(library: str, owner: object, name: str, what: str):
    """``owner.name``, or a failure that names it."""
    if not hasattr(owner, name):
        where = f"{owner.__name__}.{name}" if hasattr(owner, "__name__") else name
        pytest.fail(gone(library, where, what))
    return getattr(owner, name)


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def assert_calls(library: str, owner: object, name: str, what: str) -> None:
    """``owner``'s source still calls ``self.name(``: an override of it is
    still what the library runs."""
    if f"self.{name}(" not in inspect.getsource(owner):
        pytest.fail(gone(library, f"{owner.__name__} calling self.{name}()", what))


class Recording(ServerProtocol):
    too_big: list[tuple[int, int]]

    def message_too_big(self, size: int, limit: int, reason: str) -> str:
        self.too_big.append((size, limit))
        return "ours"


def connected(**options) -> Recording:
    """A server protocol on an in-memory transport, its connection open."""
    factory = WebSocketServerFactory()
    factory.protocol = Recording
    # As the service has it (failByDrop=False), without timers.
    factory.setProtocolOptions(
        openHandshakeTimeout=0, closeHandshakeTimeout=0, failByDrop=False, **options
    )
    protocol = factory.buildProtocol(None)
    protocol.too_big = []
    protocol.makeConnection(StringTransport())
    protocol.state = protocol.STATE_OPEN
    protocol.transport.clear()
    return protocol


# -- Autobahn ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected", "what"),
    [
        (
            "_max_message_size_exceeded",
            ["self", "msg_size", "max_msg_size", "reason"],
            "message_too_big, before a 1009 close",
        ),
        (
            "sendCloseFrame",
            ["self", "code", "reasonUtf8", "isReply"],
            "send_close, with codes sendClose() refuses",
        ),
    ],
)
def test_autobahn_methods(name: str, expected: list[str], what: str) -> None:
    method = relied_on("autobahn", autobahn_protocol.WebSocketProtocol, name, what)
    assert parameters(method) == expected, gone(
        "autobahn", f"WebSocketProtocol.{name}{tuple(expected[1:])}", what
    )


def test_autobahn_still_calls_the_hook_compat_overrides() -> None:
    assert_calls(
        "autobahn",
        autobahn_protocol.WebSocketProtocol,
        "_max_message_size_exceeded",
        "message_too_big, before a 1009 close",
    )


def test_autobahn_logs_a_denial_through_the_protocols_log() -> None:
    """``failHandshake`` (and the ``dropConnection`` it calls) log through
    ``self.log``, which ServerProtocol silences for a denial already
    logged (tests/test_http.py counts the lines of a real one)."""
    server = autobahn_protocol.WebSocketServerProtocol
    assert parameters(server.failHandshake) == ["self", "reason", "code", "responseHeaders"], \
        gone("autobahn", "WebSocketServerProtocol.failHandshake(reason, code, responseHeaders)",
             "one log line per refused origin")
    for method in (server.failHandshake, autobahn_protocol.WebSocketProtocol.dropConnection):
        assert "self.log." in inspect.getsource(method), gone(
            "autobahn", f"{method.__qualname__} logging through self.log",
            "one log line per refused origin")


def test_autobahn_connection_state() -> None:
    protocol = connected()
    what = "send_text's bypass of sendMessage()"
    assert relied_on("autobahn", protocol, "_perMessageCompress", what) is None
    assert isinstance(relied_on("autobahn", protocol, "send_queue", what), deque), gone(
        "autobahn", "WebSocketProtocol.send_queue (a deque)", what
    )
    assert relied_on("autobahn", protocol, "failedByMe", "hold_message_to") is False
    protocol.onMessageBegin(False)
    protocol.onMessageFrameBegin(5)
    protocol.onMessageFrameBegin(7)
    assert relied_on("autobahn", protocol, "message_data_total_length", "hold_message_to") == 12


def test_send_text_writes_what_send_message_would() -> None:
    for size in (0, 5, 125, 126, 70_000):
        frame = b"x" * size
        ours, theirs = connected(), connected()
        ours.send_text(frame)
        theirs.sendMessage(frame)
        assert ours.transport.value() == theirs.transport.value(), gone(
            "autobahn",
            "PreparedMessage(...).payloadHybi (the frame sendMessage() writes)",
            "send_text",
        )


def test_send_text_waits_behind_what_autobahn_queued() -> None:
    protocol = connected()
    protocol.send_queue.append((b"queued", False))
    protocol.send_text(b"later")
    # Autobahn wrote what it had queued; ours waits behind it, in its queue.
    assert protocol.transport.value() == b"queued"
    assert len(protocol.send_queue) == 1
    protocol.send_queue.clear()  # nothing for its timer to write


def test_a_frame_over_the_limit_is_refused_through_message_too_big() -> None:
    protocol = connected(maxFramePayloadSize=10)
    protocol.onMessageBegin(False)
    protocol.onMessageFrameBegin(11)
    assert protocol.too_big == [(11, 10)], gone(
        "autobahn", "onMessageFrameBegin calling _max_message_size_exceeded", "message_too_big"
    )
    assert protocol.failedByMe


def test_hold_message_to_refuses_a_message_over_the_limit() -> None:
    protocol = connected()
    protocol.onMessageBegin(False)
    protocol.onMessageFrameBegin(6)
    protocol.hold_message_to(10)
    assert protocol.too_big == []
    protocol.onMessageFrameBegin(6)
    protocol.hold_message_to(10)
    assert protocol.too_big == [(12, 10)]
    # Once failing, not again.
    protocol.onMessageFrameBegin(6)
    protocol.hold_message_to(10)
    assert protocol.too_big == [(12, 10)]


def test_send_close_sends_any_code() -> None:
    protocol = connected()
    protocol.send_close(1013, "é" * 100)
    written = protocol.transport.value()
    assert written[:2] == b"\x88\x7d", written[:2]  # a close frame of 125 bytes
    assert written[2:4] == (1013).to_bytes(2, "big")


@pytest.mark.parametrize(
    ("module", "name"),
    [
        (autobahn_protocol, "pformat"),
        (autobahn_protocol, "hltype"),
        (autobahn_protocol, "hlval"),
        (autobahn_twisted, "hltype"),
        (autobahn_twisted, "hlval"),
    ],
)
def test_debug_formatting_is_deferred_by_an_explicit_call_only(
    monkeypatch: pytest.MonkeyPatch, module, name: str
) -> None:
    from twisted.internet.task import Clock

    from redmessenger.settings import Settings
    from redmessenger.websocket import RedMessengerFactory

    what = "defer_autobahn_debug_formatting"
    relied_on("autobahn", module, name, what)
    assert f"{name}(" in inspect.getsource(module), gone(
        "autobahn", f"{module.__name__} calling {name}()", what
    )
    # As Autobahn has them (a service started earlier in this process, in
    # another test, made them lazy), put back when the test ends.
    monkeypatch.setattr(autobahn_protocol, "pformat", pprint.pformat)
    monkeypatch.setattr(autobahn_protocol.Timings, "__str__", autobahn_protocol.Timings.__str__)
    for each in (autobahn_protocol, autobahn_twisted):
        monkeypatch.setattr(each, "hltype", autobahn_util.hltype)
        monkeypatch.setattr(each, "hlval", autobahn_util.hlval)
    real = getattr(module, name)
    RedMessengerFactory(None, None, Settings(), Clock(), "test", lambda: True, lambda: None)
    assert getattr(module, name) is real  # building a factory leaves it
    compat.defer_autobahn_debug_formatting()
    deferred = getattr(module, name)
    compat.defer_autobahn_debug_formatting()
    assert getattr(module, name) is deferred is not real
    value = ServerProtocol.dataReceived if name == "hltype" else {"a": 1}
    assert f"{deferred(value)}" == str(deferred(value)) == real(value)
    timings = autobahn_protocol.Timings()  # an application's, with trackTimings
    timings.track("onOpen")
    assert str(timings).startswith("{'onOpen': ")


# -- Twisted ------------------------------------------------------------------


def test_twisted_high_water_mark() -> None:
    what = "set_high_water (the socket's high-water mark)"
    assert isinstance(relied_on("twisted", abstract.FileDescriptor, "bufferSize", what), int)
    assert "self.bufferSize" in inspect.getsource(abstract.FileDescriptor), gone(
        "twisted", "FileDescriptor reading self.bufferSize", what
    )
    assert issubclass(tcp.Connection, abstract.FileDescriptor), gone(
        "twisted", "tcp.Connection as a FileDescriptor", what
    )
    assert issubclass(TLSMemoryBIOProtocol, ProtocolWrapper), gone(
        "twisted", "TLSMemoryBIOProtocol as a ProtocolWrapper", what
    )


def test_a_port_accepts_no_more_than_the_cap_per_turn() -> None:
    """On a real listening socket with 10 connects waiting: the first turn
    accepts 3 however many Twisted would, and so does the next."""
    import socket

    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    what = "cap_accepts_per_turn (a storm of connects spread over turns)"
    assert "self.numberAccepts" in inspect.getsource(tcp.Port.doRead), gone(
        "twisted", "tcp.Port.doRead reading self.numberAccepts", what
    )
    accepted = []

    class Counted(Protocol):
        def connectionMade(self) -> None:
            accepted.append(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Counted), interface="127.0.0.1")
    relied_on("twisted", port, "numberAccepts", what)
    clients = []
    try:
        port.stopReading()  # the test turns it by hand
        port.numberAccepts = 1000  # as grown by a storm
        compat.cap_accepts_per_turn(port, 3)
        for _ in range(10):
            clients.append(socket.create_connection(("127.0.0.1", port.getHost().port)))
        port.doRead()
        assert len(accepted) == 3
        port.doRead()
        assert len(accepted) == 6
    finally:
        for connection in accepted:
            connection.transport.abortConnection()
        for client in clients:
            client.close()
        port.stopListening()


def test_a_reactor_turn_handles_no_more_ready_sockets_than_the_cap() -> None:
    """A real epoll reactor (not the running one) with 5 ready sockets:
    capped at 2, its turns handle 2, 2 and 1, each socket once."""
    import socket

    from twisted.internet import epollreactor
    from twisted.internet.abstract import FileDescriptor

    what = "cap_events_per_turn (ready sockets spread over turns)"
    reactor = epollreactor.EPollReactor()
    relied_on("twisted", reactor, "_poller", what)
    assert "self._poller.poll(" in inspect.getsource(epollreactor.EPollReactor.doPoll), gone(
        "twisted", "EPollReactor.doPoll calling self._poller.poll()", what
    )
    turns: list[list[int]] = []

    class Ready(FileDescriptor):
        def __init__(self, sock: socket.socket) -> None:
            super().__init__(reactor)
            self.sock = sock

        def fileno(self) -> int:
            return self.sock.fileno()

        def doRead(self) -> None:
            self.sock.recv(1)  # read: not ready again
            turns[-1].append(self.fileno())

    pairs = [socket.socketpair() for _ in range(5)]
    try:
        compat.cap_events_per_turn(reactor, 2)
        compat.cap_events_per_turn(reactor, 2)  # once is enough
        readers = [Ready(mine) for mine, _ in pairs]
        for reader, (_, theirs) in zip(readers, pairs, strict=True):
            reader.startReading()
            theirs.send(b"x")
        for _ in range(4):
            turns.append([])
            reactor.doIteration(0)
        assert [len(turn) for turn in turns] == [2, 2, 1, 0]
        assert sorted(fd for turn in turns for fd in turn) == sorted(r.fileno() for r in readers)
    finally:
        for mine, theirs in pairs:
            mine.close()
            theirs.close()
        reactor._poller.close()


# -- txredisapi ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("tryConvertData", "bytes_protocol's replies as hiredis gives them"),
        ("_build_command", "bytes_protocol's commands packed by hiredis"),
    ],
)
def test_txredisapi_hooks(name: str, what: str) -> None:
    base = compat.txredisapi().BaseRedisProtocol
    relied_on("txredisapi", base, name, what)
    assert_calls("txredisapi", base, name, what)


def test_bytes_protocol_does_what_txredisapi_does_with_bytes_only_settings() -> None:
    import hiredis

    relied_on("hiredis", hiredis, "pack_command", "bytes_protocol's commands")
    base = compat.txredisapi().RedisProtocol
    ours = compat.bytes_protocol(base)(charset=None, convertNumbers=False)
    theirs = base(charset=None, convertNumbers=False)
    command = (b"EVALSHA", b"f" * 40, 2, b"rm:users:u1:messages", b"k", b"\x00\xff", 12345)
    assert ours._build_command(*command) == theirs._build_command(*command)
    reply = [b"1", [b"x", None, 3, [b"", b"2.5"]], None, 7]
    assert ours.tryConvertData(reply) == theirs.tryConvertData(reply)


def test_bytes_protocol_keeps_why_its_connection_was_lost() -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    txredisapi = compat.txredisapi()
    relied_on(
        "txredisapi",
        txredisapi.BaseRedisProtocol,
        "whenDisconnected",
        "lost_reason of a connection lost during its setup",
    )
    proto = compat.bytes_protocol(txredisapi.RedisProtocol)(charset=None, convertNumbers=False)
    disconnected = proto.whenDisconnected()
    proto.makeConnection(StringTransport())
    why = Failure(ConnectionDone())
    proto.connectionLost(why)
    assert proto.lost_reason is why
    assert disconnected.called


# -- the wall -----------------------------------------------------------------


def test_every_private_name_in_compat_is_checked() -> None:
    source = Path(compat.__file__).read_text()
    named = set(re.findall(r"\.(_[A-Za-z]\w*)", source))
    own = set(compat._Lazy.__slots__) | set(compat._CappedPoller.__slots__)
    assert named - own <= CHECKED_PRIVATES, named - own - CHECKED_PRIVATES


def test_only_compat_names_other_libraries_internals() -> None:
    package = Path(compat.__file__).parent
    pattern = re.compile(r"\b(" + "|".join(INTERNALS) + r")\b")
    found = {
        f"{path.name}: {name}"
        for path in package.glob("*.py")
        if path.name != "compat.py"
        for name in pattern.findall(path.read_text())
    }
    assert not found, found
