"""A Twisted client for the RedMessenger WebSocket protocol (docs/protocol.rst).

It stays connected: a server restart (1001), a dropped connection (1006) or
a refusal worth retrying (1013, ...) is followed by a reconnect with
exponential backoff and jitter, so that many clients do not come back all at
once. A refusal that would only be repeated (4000 ``bad_hello``, 4001
``unauthorized``, ...) stops the client and is surfaced instead.

Messages are handed to the handler one at a time, in order. In ack mode the
client acknowledges a message only once the handler has succeeded: returned,
or its Deferred (or coroutine) has fired with a result. A handler that
raises, or whose Deferred fails, refuses the message (a nack): the client
acknowledges what was handled before it, closes the connection and
reconnects, and the server sends the message again, then the ones after it.
The client remembers the ids it handled, so that a message the server sends
again (it was not acknowledged when the socket went away) is not handed
over twice.

While ``max_pending`` messages or more wait for the handler, the client
stops reading from the connection, so that a slow handler leaves messages
with the server (which stores them, or closes the connection with 4010 past
``--max-socket-buffer``) instead of in this process' memory.

The backoff between attempts only starts again from its shortest delay once
a connection has stayed up for ``stable_after`` seconds: a server that
welcomes and then closes is not hammered. ``key`` may be a function that
returns the key (or a Deferred or coroutine of it), called before every
attempt, for keys that expire (a JWT).

Usage::

    client = RedMessengerClient("ws://127.0.0.1:8080/", "user1", key="s3cret",
                                ack=True, on_message=print)
    client.startService()          # or client.setServiceParent(application)
    welcome = await client.whenWelcomed()
    ...
    await client.stopService()     # acknowledges what was handled, closes 1000
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import random
from base64 import b64decode
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._version import __version__
from .frames import FINAL_CLOSE_CODES, FINAL_ERRORS

log = Logger()

#: Seconds a key function may take before the attempt counts as failed.
KEY_TIMEOUT = 10.0


def backoff(initial: float = 0.1, maximum: float = 30.0,
            factor: float = 2.0) -> Callable[[int], float]:
    """Exponential backoff with "equal jitter": attempt ``n`` (from 1) waits
    between half and all of ``min(maximum, initial * factor ** (n - 1))``
    seconds, so clients dropped together do not return together."""

    def policy(attempt: int) -> float:
        ceiling = min(maximum, initial * factor ** min(max(attempt - 1, 0), 64))
        return random.uniform(ceiling / 2, ceiling)

    return policy


@dataclass(frozen=True)
class Message:
    """One ``message`` frame; ``payload`` is the published bytes, whether
    the frame carried them as ``payload`` or ``payload_base64``."""

    id: str
    source: str
    timestamp: int
    payload: bytes
    bubble: bool
    queued: bool
    #: This socket's number for the message, in ack mode; else ``None``.
    tag: int | None = None

    @classmethod
    def from_frame(cls, doc: dict[str, Any]) -> Message:
        """Raise ``ValueError`` for a frame that is not a valid message."""
        try:
            if "payload" in doc:
                if not isinstance(doc["payload"], str):
                    raise ValueError('"payload" is not a string')
                payload = doc["payload"].encode("utf-8", "surrogatepass")
            else:
                payload = b64decode(doc["payload_base64"], validate=True)
            tag = doc.get("tag")
            message = cls(doc["id"], doc["source"], doc["timestamp"], payload,
                          bool(doc.get("bubble", True)), bool(doc.get("queued", False)), tag)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a valid message frame: {e!r}") from None
        if not (isinstance(message.id, str) and isinstance(message.source, str)
                and isinstance(message.timestamp, int)
                and (tag is None or (isinstance(tag, int) and not isinstance(tag, bool)))):
            raise ValueError("not a valid message frame: a field has the wrong type")
        return message


@dataclass(frozen=True)
class Welcome:
    """The server's ``welcome``: who we are, and how many stored messages follow."""

    id: str
    channel: str
    queued: int
    ack: bool


@dataclass(frozen=True)
class ServerError:
    """An ``error`` frame: ``code`` is for programs, ``reason`` for humans."""

    code: str
    reason: str


class State(enum.Enum):
    CONNECTING = "connecting"
    #: The WebSocket is open and the hello was sent.
    CONNECTED = "connected"
    WELCOMED = "welcomed"
    #: The connection is gone; a reconnect follows unless the client stops.
    DISCONNECTED = "disconnected"
    STOPPED = "stopped"


@dataclass(frozen=True)
class StateChange:
    state: State
    #: The WebSocket close code (DISCONNECTED), 1006 for a dropped
    #: connection, ``None`` when no connection was made at all.
    close_code: int | None = None
    reason: str | None = None
    #: Seconds until the next attempt (DISCONNECTED); ``None`` if there is none.
    retry_in: float | None = None


class ClientStopped(Exception):
    """The client stopped before what was waited for happened."""


class Refused(ClientStopped):
    """The server refused us for good (a final close code): reconnecting would
    only be refused again, so the client stopped."""

    def __init__(self, close_code: int | None, error: ServerError | None,
                 reason: str | None) -> None:
        self.close_code = close_code
        self.error = error
        self.reason = error.reason if error is not None else reason
        code = error.code if error is not None else "closed"
        super().__init__(f"refused with close code {close_code} ({code}: {self.reason})")


class RecentIds:
    """The last ``size`` message ids handed to the handler: enough to
    recognize a redelivery (which comes soon after the original), in bounded
    memory."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("the dedup memory must hold at least one id")
        self.size = size
        self._ids: dict[str, None] = {}

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, message_id: str) -> None:
        self._ids.pop(message_id, None)
        self._ids[message_id] = None
        if len(self._ids) > self.size:
            del self._ids[next(iter(self._ids))]


class _Protocol(WebSocketClientProtocol):
    """One connection; the client decides everything, this only relays and
    keeps the connection's own ack bookkeeping (tags are per socket)."""

    factory: _Factory
    last_error: ServerError | None = None
    #: The highest tag whose message (and every one before it) was handled.
    handled_tag = 0
    acked_tag = 0
    _ack_timer = None
    #: Not reading, because the handler is behind.
    paused = False

    def __init__(self) -> None:
        super().__init__()
        #: Fires once the connection is closed and the client was told.
        self.closed: defer.Deferred[None] = defer.Deferred()

    def onOpen(self) -> None:
        self.factory.client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.client._frame(self, payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._ack_timer is not None and self._ack_timer.active():
            self._ack_timer.cancel()
        self.factory.client._closed(self, code, reason)
        if not self.closed.called:
            self.closed.callback(None)

    @property
    def open_now(self) -> bool:
        return self.state == self.STATE_OPEN

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pauseProducing()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()
            if self.open_now and self.autoPingInterval and not (
                    self.autoPingPendingCall or self.autoPingTimeoutCall):
                self._sendAutoPing()  # the one skipped while paused

    def onAutoPingTimeout(self) -> None:
        """A pong we do not read is no sign of a dead server: while paused,
        skip the timeout (a ping follows on resume)."""
        if self.paused:
            self.autoPingTimeoutCall = None
            return
        super().onAutoPingTimeout()

    def refuse(self, message_id: str) -> None:
        """Nack: acknowledge what was handled, and close, so that the server
        sends the rest again, starting with the refused message."""
        if self.open_now:
            self.flush_acks()
            self.resume()
            self.sendClose(1000, f"the handler refused message {message_id}"[:120])

    def handled(self, tag: int | None) -> None:
        """The handler is done with the message tagged ``tag``: acknowledge
        it now, or soon, together with the ones after it."""
        client = self.factory.client
        if tag is None or tag <= self.handled_tag or not self.open_now:
            return  # a closed socket's tags mean nothing to the next one
        self.handled_tag = tag
        if self.handled_tag - self.acked_tag >= client.ack_every:
            self.flush_acks()
        elif client.ack_delay is not None and self._ack_timer is None:
            self._ack_timer = client.reactor.callLater(client.ack_delay, self.flush_acks)

    def flush_acks(self) -> None:
        if self._ack_timer is not None and self._ack_timer.active():
            self._ack_timer.cancel()
        self._ack_timer = None
        if self.handled_tag > self.acked_tag and self.open_now:
            self.sendMessage(json.dumps({"type": "ack", "tag": self.handled_tag}).encode())
            self.acked_tag = self.handled_tag


class _Factory(WebSocketClientFactory):
    protocol = _Protocol
    noisy = False

    def __init__(self, client: RedMessengerClient, url: str) -> None:
        super().__init__(url, useragent=f"RedMessengerClient/{__version__}",
                         reactor=client.reactor)
        self.client = client


_Callback = Callable[[Any], object]
#: A key, or where to get a fresh one before each attempt.
KeySource = Callable[[], "str | None | defer.Deferred[str | None] | Awaitable[str | None]"]


class RedMessengerClient(Service):
    """A user's connection to RedMessenger that reconnects by itself.

    ``on_message(Message)`` may return a Deferred or a coroutine: the next
    message waits for it and, in ack mode, so does the message's ack. If it
    raises, or its result fails, the message is refused: in ack mode the
    connection is closed and the server sends it again (see the module's
    docstring); in plain mode it is logged, since nothing can be sent again.
    ``on_welcome(Welcome)``, ``on_error(ServerError)`` and
    ``on_state(StateChange)`` are notifications; whatever they raise is
    logged and otherwise ignored.

    ``key`` is the user's key, or a function called before every attempt
    that returns it, or a Deferred or coroutine of it. Past ``max_pending``
    messages waiting for the handler the client stops reading until half of
    them are handled. The backoff starts again from ``retry_policy(1)``
    only after a connection has stayed up ``stable_after`` seconds.

    Acks are batched: the highest handled tag is sent once ``ack_every``
    messages are waiting for it, or ``ack_delay`` seconds after the first
    of them (``None``: only by count, and when the client stops). The ids
    of the last ``dedup_size`` handled messages are remembered, and a
    message seen again is acknowledged but not handed over.
    """

    def __init__(self, url: str, uid: str, key: str | KeySource | None = None,
                 ack: bool = False, reactor: Any = None, *,
                 on_message: Callable[[Message], object] | None = None,
                 on_welcome: Callable[[Welcome], object] | None = None,
                 on_error: Callable[[ServerError], object] | None = None,
                 on_state: Callable[[StateChange], object] | None = None,
                 ack_every: int = 50, ack_delay: float | None = 0.2,
                 dedup_size: int = 10_000,
                 retry_policy: Callable[[int], float] | None = None,
                 stable_after: float = 30.0,
                 max_pending: int = 100,
                 ping_interval: float | None = 30.0,
                 endpoint: IStreamClientEndpoint | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        if ack_every < 1:
            raise ValueError("ack_every must be at least 1")
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.url = url
        self.uid = uid
        self.key = key
        self.ack = ack
        self.reactor = reactor
        self.on_message = on_message
        self.on_welcome = on_welcome
        self.on_error = on_error
        self.on_state = on_state
        self.ack_every = ack_every
        self.ack_delay = ack_delay
        self.retry_policy = retry_policy or backoff()
        self.stable_after = stable_after
        self.max_pending = max_pending
        self.seen = RecentIds(dedup_size)
        self.state = State.STOPPED
        #: The last welcome received (of this connection or an earlier one).
        self.welcome: Welcome | None = None
        #: Why the client stopped by itself, if it did.
        self.refused: Refused | None = None
        #: Messages handed to the handler, and redeliveries kept from it.
        self.delivered = 0
        self.duplicates = 0
        self._endpoint = endpoint or self._endpoint_for(url, reactor)
        self._factory = _Factory(self, url)
        options: dict[str, Any] = {"openHandshakeTimeout": 10.0, "closeHandshakeTimeout": 5.0}
        if ping_interval:
            options.update(autoPingInterval=ping_interval, autoPingTimeout=ping_interval / 2)
        self._factory.setProtocolOptions(**options)
        self._protocol: _Protocol | None = None
        self._key: str | None = None
        self._connecting: defer.Deferred | None = None
        self._retry = None
        self._stable_timer = None
        #: Attempts since the last connection that stayed up ``stable_after``.
        self.attempts = 0
        self._welcome_waiters: list[defer.Deferred] = []
        self._stop_waiters: list[defer.Deferred] = []
        self._stopping: defer.Deferred | None = None
        # Messages waiting for the handler, with the connection and tag to
        # ack them with (no message: a bad frame, acknowledged in its turn).
        self._inbox: deque[tuple[Message | None, _Protocol, int | None]] = deque()
        self._busy = False
        #: The connection not read from while the handler catches up.
        self._held: _Protocol | None = None

    @staticmethod
    def _endpoint_for(url: str, reactor) -> IStreamClientEndpoint:
        secure, host, port, *_ = parse_url(url)
        endpoint = HostnameEndpoint(reactor, host, port, timeout=10)
        if secure:
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint

    # -- public API ----------------------------------------------------------

    def startService(self) -> None:
        if self.running:
            return
        super().startService()
        self.refused = None
        self.attempts = 0
        self._stopping = None
        self._connect()

    def stopService(self) -> defer.Deferred:
        """Stop reconnecting; acknowledge what was handled and close with
        1000. Fires once the connection is closed."""
        if self._stopping is not None:
            return _chain(self._stopping)
        if not self.running:
            return defer.succeed(None)
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._cancel_stable_timer()
        proto = self._protocol
        if self._connecting is not None:
            self._connecting.cancel()
        if proto is None:
            self._finish(None)
            return defer.succeed(None)
        if proto.open_now:
            proto.flush_acks()
            proto.resume()  # to read the server's close frame
            proto.sendClose(1000)
        else:
            proto.dropConnection(abort=True)
        self._stopping = proto.closed
        self._stopping.addCallback(lambda _: self._finish(None))
        return _chain(self._stopping)

    def whenWelcomed(self) -> defer.Deferred[Welcome]:
        """Fires with the current connection's welcome, or the next one's;
        fails with ``Refused`` or ``ClientStopped`` if the client stops first."""
        if self.state is State.WELCOMED and self.welcome is not None:
            return defer.succeed(self.welcome)
        if not self.running:
            return defer.fail(self.refused or ClientStopped("the client is not running"))
        d: defer.Deferred[Welcome] = defer.Deferred()
        self._welcome_waiters.append(d)
        return d

    def whenStopped(self) -> defer.Deferred[None]:
        """Fires when the client stops: with ``None`` after ``stopService``,
        failing with ``Refused`` when the server refused it for good."""
        if not self.running and self._stopping is None:
            return defer.fail(self.refused) if self.refused else defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._stop_waiters.append(d)
        return d

    @property
    def pending(self) -> int:
        """Messages received and waiting for the handler (behind a handler
        Deferred that has not fired yet)."""
        return len(self._inbox)

    @property
    def acked(self) -> int:
        """The highest tag acknowledged on the current connection."""
        return self._protocol.acked_tag if self._protocol is not None else 0

    # -- connecting ----------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        self._set_state(StateChange(State.CONNECTING))
        log.debug("Connecting to {url} as {uid}", url=self.url, uid=self.uid)
        d = self._connecting = self._fetch_key()
        d.addCallback(self._key_ready)
        d.addCallbacks(self._transport_up, self._connect_failed)

    def _fetch_key(self) -> defer.Deferred[str | None]:
        """The key for this attempt: ``key`` itself, or what its function
        gives now (a fresh JWT, say)."""
        if not callable(self.key):
            return defer.succeed(self.key)
        d = defer.maybeDeferred(self.key)
        d.addCallback(lambda key: defer.ensureDeferred(key) if inspect.isawaitable(key)
                      and not isinstance(key, defer.Deferred) else key)
        d.addTimeout(KEY_TIMEOUT, self.reactor)
        return d.addErrback(self._key_failed)

    def _key_failed(self, failure: Failure) -> Failure:
        if self.running:  # not cancelled by stopService
            log.error("Could not get the key for {uid}: {why}; the attempt failed",
                      uid=self.uid, why=failure.getErrorMessage() or failure.type.__name__)
        return failure

    def _key_ready(self, key: object) -> defer.Deferred[_Protocol]:
        if key is not None and not isinstance(key, str):
            raise TypeError(f"the key function returned {type(key).__name__}, not a string")
        self._key = key
        return self._endpoint.connect(self._factory)

    def _transport_up(self, proto: _Protocol) -> None:
        self._connecting = None
        self._protocol = proto

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if not self.running:
            return
        self._disconnected(None, failure.getErrorMessage())

    def _opened(self, proto: _Protocol) -> None:
        hello: dict[str, Any] = {"id": self.uid}
        if self._key is not None:
            hello["key"] = self._key
        if self.ack:
            hello["ack"] = True
        proto.sendMessage(json.dumps(hello).encode())
        self._set_state(StateChange(State.CONNECTED))

    def _closed(self, proto: _Protocol, code: int | None, reason: str | None) -> None:
        if proto is self._protocol:
            self._protocol = None
            self._cancel_stable_timer()
        if proto is self._held:
            self._held = None
        if not self.running:  # stopService closed it
            self._set_state(StateChange(State.DISCONNECTED, code, reason))
            return
        error = proto.last_error
        if code in FINAL_CLOSE_CODES or (error is not None and error.code in FINAL_ERRORS):
            self._give_up(code, error, reason)
        else:
            self._disconnected(code, reason)

    def _disconnected(self, code: int | None, reason: str | None) -> None:
        """Lost or refused for now: try again after a backoff that grows with
        every attempt since the last connection that stayed up for
        ``stable_after`` seconds."""
        self.attempts += 1
        delay = self.retry_policy(self.attempts)
        log.info("Disconnected from {url} ({code}: {reason}); reconnecting in "
                 "{delay:.2f} s", url=self.url, code=code, reason=reason, delay=delay)
        self._set_state(StateChange(State.DISCONNECTED, code, reason, delay))
        self._retry = self.reactor.callLater(delay, self._connect)

    def _give_up(self, code: int | None, error: ServerError | None,
                 reason: str | None) -> None:
        self.refused = Refused(code, error, reason)
        log.error("Refused by {url} as {uid}: {why}; not reconnecting", url=self.url,
                  uid=self.uid, why=str(self.refused))
        Service.stopService(self)
        self._set_state(StateChange(State.DISCONNECTED, code, reason))
        self._finish(self.refused)

    def _finish(self, refused: Refused | None) -> None:
        self._stopping = None
        self._set_state(StateChange(State.STOPPED))
        welcome_waiters, self._welcome_waiters = self._welcome_waiters, []
        for d in welcome_waiters:
            d.errback(refused or ClientStopped("the client stopped"))
        stop_waiters, self._stop_waiters = self._stop_waiters, []
        for d in stop_waiters:
            if refused is None:
                d.callback(None)
            else:
                d.errback(refused)

    # -- frames --------------------------------------------------------------

    def _frame(self, proto: _Protocol, payload: bytes, is_binary: bool) -> None:
        try:
            doc = json.loads(payload)
            kind = doc.get("type")
        except (ValueError, AttributeError):
            log.warn("Ignoring a frame from {url} that is not a JSON object: {frame!r}",
                     url=self.url, frame=payload[:200])
            return
        if kind == "message":
            if self.ack and not proto.open_now:
                # Sent before our close crossed it: it cannot be acknowledged
                # any more, so the server sends it again; after a nack, it
                # must not be handled before the refused one.
                return
            try:
                message: Message | None = Message.from_frame(doc)
                tag = message.tag
            except ValueError as e:
                log.warn("Ignoring a bad message frame from {url}: {why}",
                         url=self.url, why=str(e))
                message, tag = None, doc.get("tag")
                if not isinstance(tag, int):
                    return
            self._inbox.append((message, proto, tag))
            self._flow(proto)
            self._process()
        elif kind == "welcome":
            self._welcomed(proto, doc)
        elif kind == "error":
            error = ServerError(str(doc.get("code")), str(doc.get("reason")))
            proto.last_error = error
            log.warn("{url} says {code}: {reason}", url=self.url, code=error.code,
                     reason=error.reason)
            self._notify(self.on_error, error)
        else:
            log.debug("Ignoring a {kind!r} frame from {url}", kind=kind, url=self.url)

    def _welcomed(self, proto: _Protocol, doc: dict[str, Any]) -> None:
        welcome = Welcome(str(doc.get("id")), str(doc.get("channel")),
                          int(doc.get("queued", 0)), bool(doc.get("ack", False)))
        self.welcome = welcome
        self._cancel_stable_timer()
        self._stable_timer = self.reactor.callLater(self.stable_after, self._stable)
        log.info("Welcomed by {url} as {uid} on {channel}; {queued} stored messages "
                 "follow", url=self.url, uid=welcome.id, channel=welcome.channel,
                 queued=welcome.queued)
        self._set_state(StateChange(State.WELCOMED))
        waiters, self._welcome_waiters = self._welcome_waiters, []
        for d in waiters:
            d.callback(welcome)
        self._notify(self.on_welcome, welcome)

    def _stable(self) -> None:
        """This connection stayed up: the next loss starts the backoff over."""
        self._stable_timer = None
        self.attempts = 0

    def _cancel_stable_timer(self) -> None:
        if self._stable_timer is not None and self._stable_timer.active():
            self._stable_timer.cancel()
        self._stable_timer = None

    def _flow(self, proto: _Protocol | None = None) -> None:
        """Stop reading (``proto``, which just brought a message) while the
        handler is ``max_pending`` messages behind; read again once it has
        caught up by half."""
        if len(self._inbox) >= self.max_pending:
            if proto is not None and proto is not self._held:
                proto.pause()
                self._held = proto
        elif self._held is not None and len(self._inbox) <= self.max_pending // 2:
            held, self._held = self._held, None
            held.resume()

    def _process(self) -> None:
        """Hand messages over one at a time; a handler's Deferred holds back
        the next message, and the ack, until it fires."""
        while self._inbox and not self._busy:
            message, proto, tag = self._inbox.popleft()
            self._flow()
            if message is None:
                proto.handled(tag)
                continue
            if message.id in self.seen:
                self.duplicates += 1
                log.debug("Message {id} was already handled; acknowledging it only",
                          id=message.id)
                proto.handled(message.tag)
                continue
            self.delivered += 1
            outcome = self._hand_over(message)
            if not outcome.called:
                self._busy = True
                outcome.addBoth(self._handled_later, message, proto)
                return
            outcome.addBoth(self._settle, message, proto)

    def _hand_over(self, message: Message) -> defer.Deferred[None]:
        """The handler's outcome: ``None`` once it succeeded, failing if it
        raised or its result failed."""
        if self.on_message is None:
            return defer.succeed(None)
        try:
            result = self.on_message(message)
        except Exception:
            return defer.fail()
        if isinstance(result, defer.Deferred):
            waiting = result
        elif inspect.iscoroutine(result):
            waiting = defer.ensureDeferred(result)
        elif isinstance(result, asyncio.Future):
            waiting = defer.Deferred.fromFuture(result)
        else:
            return defer.succeed(None)
        return waiting.addCallback(lambda _: None)

    def _settle(self, failure: Failure | None, message: Message, proto: _Protocol) -> None:
        if failure is None or not self.ack:
            if failure is not None:
                log.failure("The message handler failed on message {id}; in plain "
                            "mode it cannot be sent again", failure, id=message.id)
            self.seen.add(message.id)
            proto.handled(message.tag)
            return
        log.failure("The message handler refused message {id}: closing, so that it "
                    "is sent again", failure, id=message.id)
        # What came after it on this connection comes again after it.
        self._inbox = deque(entry for entry in self._inbox if entry[1] is not proto)
        proto.refuse(message.id)

    def _handled_later(self, failure: Failure | None, message: Message,
                       proto: _Protocol) -> None:
        self._busy = False
        self._settle(failure, message, proto)
        self._process()

    # -- notifications -------------------------------------------------------

    def _set_state(self, change: StateChange) -> None:
        self.state = change.state
        self._notify(self.on_state, change)

    def _notify(self, callback: _Callback | None, value: object) -> None:
        if callback is None:
            return
        try:
            callback(value)
        except Exception:
            log.failure("A client callback failed on {value!r}", value=value)


def _chain(d: defer.Deferred) -> defer.Deferred:
    """A Deferred that fires with ``d`` without taking over its result."""
    out: defer.Deferred = defer.Deferred()
    d.addBoth(lambda result: (out.callback(None), result)[1])
    return out
