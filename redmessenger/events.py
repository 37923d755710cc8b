"""Server-Sent Events: the transport for clients that cannot or should not
open a WebSocket (a proxy that strips upgrades, ``curl``, a plain
``EventSource``).

``GET <root>/events?id=<uid>`` is checked as a hello is (the key in
``Authorization: Bearer`` or ``?key=``) and answers a stream:
``event: welcome``, then one ``event: message`` per message, its ``id:``
the message's id. A stream is always in ack mode, and the resume is its
ack: a reconnect's ``Last-Event-ID`` (or ``POST <root>/events/ack``)
acknowledges every message through that id, and what came after it comes
again first. To the dispatcher a stream is a socket like a WebSocket
(``delivery.Socket``): the same limits, ack window, back-pressure and
metrics hold (docs/protocol.rst, "Server-Sent Events").
"""

from __future__ import annotations

import json
from collections import OrderedDict, defaultdict

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from . import compat, frames
from .admission import stream_admitted, stream_began
from .envelope import Envelope
from .frames import Close, Hello, ProtocolError, valid_id
from .limits import address_of
from .pacing import HIGH_WATER, Paced

log = Logger()

#: The HTTP status of a refusal, by the close code a WebSocket would get.
_STATUS = {Close.BAD_HELLO: 400, Close.BAD_FRAME: 400, Close.UNAUTHORIZED: 401,
           Close.RATE_LIMITED: 429, Close.TRY_AGAIN_LATER: 503, Close.GOING_AWAY: 503}
#: Statuses that tell the client when to come back.
_RETRY_AFTER = {429: b"5", 503: b"1"}

#: Milliseconds an ``EventSource`` waits before it reconnects (``retry:``):
#: after a restart, and after a full ack window ends a stream.
RETRY_MS = 1000

#: Seconds a stream may hold --ack-window unacknowledged messages with no
#: ack coming before it ends, so that a plain ``EventSource`` (which never
#: acknowledges but by reconnecting) goes on, and a client that posts its
#: acks is not cut off while one is on its way.
WINDOW_FULL_GRACE = 1.0

#: The most an ack's request body may hold.
MAX_ACK_BODY = 4096

#: An event's ``id:`` line ends at a line break: an id with one is not sent
#: (the client then resumes from the message before).
_UNSAFE_ID = frozenset("\r\n\0")


@implementer(IPushProducer)
class EventStream(Paced):
    """One ``GET /events`` answered: a ``delivery.Socket`` whose frames are
    events. It holds what it sent unacknowledged by id, so that a
    ``Last-Event-ID`` finds their tags."""

    ack_mode = True

    def __init__(self, streams: Streams, request, hello: Hello, peer: str) -> None:
        self.factory = streams.factory
        self.uid = hello.id
        self.peer = peer
        self._streams = streams
        self._request = request
        #: Sent and not acknowledged: message id -> tag, oldest first.
        self._unacked: OrderedDict[str, int] = OrderedDict()
        self._ended = False
        self._next_ping = None
        #: While it is paused: when it counts as too slow.
        self._stalled = None
        #: While its window is full: when it ends, unless acks come.
        self._full = None
        self._acked_at = 0.0
        #: Fires once the stream has ended (the service's stop waits).
        self.is_closed: defer.Deferred = defer.Deferred()

    def begin(self) -> None:
        """Answer the request: the stream's headers, then events."""
        request = self._request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")  # nginx: pass each event on now
        # One stream per connection: when it ends, so does the connection
        # (``_end``), which has no handshake deadline any more.
        request.setHeader(b"connection", b"close")
        # The stream's pings and back-pressure watch the connection now,
        # not twisted.web's idle timeout.
        request.channel.setTimeout(None)
        request.registerProducer(self, True)
        compat.set_high_water(request.channel.transport, HIGH_WATER)
        request.write(b"retry: %d\n\n" % RETRY_MS)
        if self.factory.ping_interval:
            self._next_ping = self.factory.reactor.callLater(self.factory.ping_interval,
                                                             self._ping)

    def _ping(self) -> None:
        """A comment every --ping-interval, so that proxies see traffic."""
        if self.writable:
            self._request.write(b": ping\n\n")
        self._next_ping = self.factory.reactor.callLater(self.factory.ping_interval, self._ping)

    def paused(self) -> None:
        """No pong shows that an event stream's client reads: bytes that do
        not leave for --ping-timeout show that it does not (or has gone),
        and it is closed as too slow, as a WebSocket whose pong is late is
        dropped. A drain to it would wait for it meanwhile."""
        super().paused()
        if self.factory.ping_interval and self._stalled is None:
            self._stalled = self.factory.reactor.callLater(self.factory.ping_timeout,
                                                           self._stalled_too_long)

    def resumed(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        super().resumed()

    def _stalled_too_long(self) -> None:
        self._stalled = None
        self.too_slow(f"took none of its stream for {self.factory.ping_timeout:g} s")

    def join(self) -> None:
        """Deliver to it from now on, unless it has ended meanwhile."""
        if not self._ended:
            self.factory.dispatcher.attach(self)

    # -- Socket, as the dispatcher sees it ----------------------------------

    def start(self, queued: int) -> None:
        welcome = frames.welcome(self.uid, self.factory.namespace.user_channel(self.uid),
                                 queued, True)
        self._request.write(b"event: welcome\ndata: %s\n\n" % welcome)

    def send(self, frame: bytes) -> bool:
        if self._ended or self._too_slow:
            return False
        if not self.writable and not self._fall_behind(len(frame)):
            return False
        message_id = Envelope.id_in_frame(frame)
        self._unacked[message_id] = Envelope.tag_in_frame(frame)
        if _UNSAFE_ID.isdisjoint(message_id):
            self._request.write(b"event: message\nid: %s\ndata: %s\n\n"
                                % (message_id.encode(), frame))
        else:
            self._request.write(b"event: message\ndata: %s\n\n" % frame)
        if len(self._unacked) >= self._streams.window and self._full is None:
            # Nothing more comes until an ack, and a plain EventSource
            # sends none: it acknowledges by reconnecting.
            self._full = self.factory.reactor.callLater(WINDOW_FULL_GRACE, self._window_full)
        return True

    def close(self, code: int, error: str, reason: str) -> None:
        if self._ended:
            return
        self.factory.dispatcher.stats.closed_by_code[code] += 1
        log.info("Closing {peer} ({uid}) with {code}: {reason}", peer=self.peer,
                 uid=self.uid, code=code, reason=reason)
        self._request.write(b"event: error\ndata: %s\n\n" % frames.error(error, reason))
        self._end()

    # -- acks ------------------------------------------------------------

    def ack_through(self, message_id: str) -> int | None:
        """The client has every message through ``message_id``: how many
        that settled, or ``None`` if this stream did not send it unacked."""
        tag = self._unacked.get(message_id)
        if tag is None:
            return None
        self._acked_at = self.factory.reactor.seconds()
        settled = 0
        while self._unacked:
            first, first_tag = self._unacked.popitem(last=False)
            settled += 1
            if first_tag == tag:
                break
        self.factory.dispatcher.ack(self, tag)
        return settled

    def _window_full(self) -> None:
        self._full = None
        if len(self._unacked) < self._streams.window:
            return  # acknowledged meanwhile
        waited = self.factory.reactor.seconds() - self._acked_at
        if waited < WINDOW_FULL_GRACE:  # acks come: the next may open it
            self._full = self.factory.reactor.callLater(WINDOW_FULL_GRACE - waited,
                                                        self._window_full)
            return
        if self.factory.trace:
            log.debug("{peer} ({uid}) has a full ack window: ending its stream, to be "
                      "acknowledged by its reconnect", peer=self.peer, uid=self.uid)
        self.end()

    # -- IPushProducer: the connection's back-pressure ---------------------

    def pauseProducing(self) -> None:
        self.paused()

    def resumeProducing(self) -> None:
        self.resumed()

    def stopProducing(self) -> None:
        pass  # the connection is lost: ``lost`` says so

    # -- the end -------------------------------------------------------------

    def end(self) -> None:
        """End the stream: what it holds unacknowledged goes to the user's
        other sockets or back to Redis, and an ``EventSource`` reconnects."""
        if not self._ended:
            self._end()

    def _end(self) -> None:
        self._stop()
        request = self._request
        channel = request.channel  # which finish() lets go of
        request.unregisterProducer()
        request.finish()
        channel.loseConnection()

    def lost(self, reason) -> None:
        """The connection is gone (or the response is finished)."""
        if self._ended:
            return
        self._stop()
        log.info("Connection {peer} ({uid}) closed", peer=self.peer, uid=self.uid)

    def _stop(self) -> None:
        self._ended = True
        for call in (self._next_ping, self._stalled, self._full):
            if call is not None and call.active():
                call.cancel()
        self.factory.dispatcher.detach(self)
        self._streams.discard(self)
        self.is_closed.callback(None)


class Streams:
    """Every event stream of a service, by user: a ``Last-Event-ID`` or an
    ack acknowledges on each of the user's streams here that sent it."""

    def __init__(self, factory, store, window: int) -> None:
        #: The WebSocket factory: what a stream shares with a WebSocket
        #: (dispatcher, limits, origins, ping interval, ``connections``).
        self.factory = factory
        self._store = store
        self.window = window
        self._by_user: defaultdict[str, set[EventStream]] = defaultdict(set)

    def __len__(self) -> int:
        return sum(len(streams) for streams in self._by_user.values())

    def add(self, stream: EventStream) -> None:
        self._by_user[stream.uid].add(stream)
        self.factory.connections.add(stream)

    def discard(self, stream: EventStream) -> None:
        streams = self._by_user.get(stream.uid)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._by_user[stream.uid]
        self.factory.connections.discard(stream)

    def ack(self, uid: str, message_id: str) -> int:
        """Acknowledge through ``message_id`` on the user's streams here that
        sent it: how many messages that settled."""
        settled = [stream.ack_through(message_id) for stream in list(self._by_user.get(uid, ()))]
        return sum(count for count in settled if count is not None)

    def resume(self, uid: str, last: str | None) -> defer.Deferred:
        """A stream reconnects having had every message through ``last``.
        A stream here that sent it is the one it replaces (an
        ``EventSource`` reconnects only once its stream has failed), or
        another tab of the user's: it is acknowledged and ended, so that
        what it holds after ``last`` goes back to the queue, to come first.
        Then the queue's head is dropped through ``last``: what went back
        unacknowledged when the old stream ended, here or on a node that
        has stopped or died. Fires once Redis has done it (or refused,
        which is logged: the messages then come again, none is lost)."""
        if last is None:
            return defer.succeed(None)
        for stream in list(self._by_user.get(uid, ())):
            if stream.ack_through(last) is not None:
                stream.end()
        d = self._store.ack_through(uid, last, self.window)
        d.addErrback(lambda failure: log.warn(
            "Could not drop what {uid} acknowledged through {id} from its queue ({why}): "
            "it comes again", uid=uid, id=last, why=failure.getErrorMessage()))
        return d


class Events(Resource):
    """``GET /events``: a new stream; ``POST /events/ack`` beneath it."""

    isLeaf = False

    def __init__(self, streams: Streams) -> None:
        super().__init__()
        self._streams = streams
        self.putChild(b"ack", EventAcks(streams))

    def getChild(self, path: bytes, request):
        return self if path == b"" else super().getChild(path, request)

    def render_OPTIONS(self, request) -> bytes:
        return _preflight(self._streams.factory, request)

    def render_HEAD(self, request) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"allow", b"GET, OPTIONS")
        return b""

    def render_GET(self, request):
        factory = self._streams.factory
        peer = _peer(request)
        try:
            _check_origin(factory, request, peer)
            hello = _hello(request, request.args.get(b"id", [None])[0])
        except ProtocolError as refusal:
            return _refuse(factory, request, peer, None, refusal)
        refusal = stream_admitted(request, factory.limits, factory.dispatcher.stats)
        if refusal is not None:
            return _answer(request, 503, "too_many_connections", refusal)
        last = _last_event_id(request)
        gone = []
        request.notifyFinish().addBoth(gone.append)
        d = factory.admit(hello, address_of(request.getClientAddress()), peer)
        d.addCallbacks(self._open, _refused_later,
                       callbackArgs=(request, hello, peer, last, gone),
                       errbackArgs=(factory, request, peer, hello.id, gone))
        d.addErrback(lambda failure: log.failure(
            "Opening the event stream of {peer} ({uid}) failed", failure, peer=peer,
            uid=hello.id))
        return NOT_DONE_YET

    def _open(self, _, request, hello: Hello, peer: str, last: str | None,
              gone: list) -> defer.Deferred | None:
        """The stream answers at once (a resume may wait for Redis's
        replicas); what ``last`` acknowledges is settled before the stream
        joins its user, so that what comes first is what came after it."""
        if gone:
            return None  # the client left while its key was checked
        stream = EventStream(self._streams, request, hello, peer)
        request.notifyFinish().addBoth(stream.lost)
        stream_began(request)
        stream.begin()
        self._streams.add(stream)
        return self._streams.resume(hello.id, last).addCallback(lambda _: stream.join())



class EventAcks(Resource):
    """``POST /events/ack`` with ``{"id": uid, "last": id}``, authenticated
    as a stream is: acknowledge without reconnecting."""

    isLeaf = True

    def __init__(self, streams: Streams) -> None:
        super().__init__()
        self._streams = streams

    def render_OPTIONS(self, request) -> bytes:
        return _preflight(self._streams.factory, request)

    def render_POST(self, request):
        factory = self._streams.factory
        peer = _peer(request)
        try:
            _check_origin(factory, request, peer)
            body = request.content.read(MAX_ACK_BODY + 1)
            if len(body) > MAX_ACK_BODY:
                raise _bad_request(f"an ack is at most {MAX_ACK_BODY} bytes")
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):
                raise _bad_request("the body is not JSON") from None
            if not isinstance(doc, dict):
                raise _bad_request('the body must be {"id": ..., "last": ...}')
            last = doc.get("last")
            if not isinstance(last, str) or not last:
                raise _bad_request('"last" must be the id of a message')
            hello = _hello(request, doc.get("id"))
        except ProtocolError as refusal:
            return _refuse(factory, request, peer, None, refusal)
        gone = []
        request.notifyFinish().addBoth(gone.append)
        d = factory.admit(hello, address_of(request.getClientAddress()), peer)
        d.addCallbacks(self._ack, _refused_later, callbackArgs=(request, hello.id, last, gone),
                       errbackArgs=(factory, request, peer, hello.id, gone))
        return NOT_DONE_YET

    def _ack(self, _, request, uid: str, last: str, gone: list) -> None:
        settled = self._streams.ack(uid, last)
        if not gone:
            request.write(_answer(request, 200, "acked", settled=settled))
            request.finish()


def _refused_later(failure, factory, request, peer: str, uid: str, gone: list) -> None:
    """What ``admit()`` refused, answered unless the client left meanwhile."""
    failure.trap(ProtocolError)
    if not gone:
        request.write(_refuse(factory, request, peer, uid, failure.value))
        request.finish()


def _peer(request) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return f"tcp:{host}:{address.port}" if host is not None else str(address)


def _check_origin(factory, request, peer: str) -> None:
    """A page from elsewhere gets nothing (as for a WebSocket); an allowed
    one may read the answer (CORS)."""
    origin = request.getHeader(b"origin")
    if origin is None:
        return
    text = origin.decode("latin-1")
    if not factory.origin_allowed(text):
        raise ProtocolError(403, "forbidden_origin", f"origin {text} is not allowed")
    request.setHeader(b"access-control-allow-origin", origin)
    request.setHeader(b"vary", b"origin")


def _preflight(factory, request) -> bytes:
    """A browser asks before a request from another origin that carries
    a key in ``Authorization`` (or posts JSON)."""
    try:
        _check_origin(factory, request, _peer(request))
    except ProtocolError as refusal:
        return _refuse(factory, request, _peer(request), None, refusal)
    request.setResponseCode(204)
    request.setHeader(b"access-control-allow-methods", b"GET, POST")
    request.setHeader(b"access-control-allow-headers",
                      b"authorization, content-type, last-event-id")
    request.setHeader(b"access-control-max-age", b"600")
    return b""


def _hello(request, uid) -> Hello:
    """The hello a stream's request stands for: its id, and its key from
    ``Authorization: Bearer`` or ``?key=``."""
    if isinstance(uid, bytes):
        try:
            uid = uid.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad_request('"id" is not valid UTF-8') from None
    if not valid_id(uid):
        raise _bad_request(f'"id" must be 1 to {frames.MAX_ID_LENGTH} printable characters '
                           "without spaces")
    key = None
    authorization = request.getHeader(b"authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            raise _bad_request("Authorization must be 'Bearer <key>'")
        key = token.strip()
    elif b"key" in request.args:
        key = request.args[b"key"][0]
    if key is not None:
        try:
            key = key.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad_request("the key is not valid UTF-8") from None
    return Hello(uid, key, ack=True)


def _last_event_id(request) -> str | None:
    """What the client had last (``Last-Event-ID``, or ``?lastEventId=``
    from a new ``EventSource``, which cannot set the header): an id we can
    read, or ``None`` (everything unacknowledged comes again)."""
    raw = request.getHeader(b"last-event-id") or request.args.get(b"lastEventId", [b""])[0]
    if not raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _bad_request(reason: str) -> ProtocolError:
    return ProtocolError(Close.BAD_HELLO, "bad_request", reason)


def _refuse(factory, request, peer: str, uid: str | None, refusal: ProtocolError) -> bytes:
    """The refusal's status and error JSON, logged once."""
    status = _STATUS.get(refusal.close_code, refusal.close_code)
    factory.dispatcher.stats.closed_by_code[status] += 1
    log.warn("Refusing the event stream of {peer} ({uid}): {error}: {reason}", peer=peer,
             uid=uid, error=refusal.error, reason=refusal.logged)
    return _answer(request, status, refusal.error, refusal.reason)


def _answer(request, status: int, code: str, reason: str | None = None, **fields) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    if status in _RETRY_AFTER:
        request.setHeader(b"retry-after", _RETRY_AFTER[status])
    doc = {"type": "error", "code": code, "reason": reason} if status >= 400 \
        else {"type": code, **fields}
    body = json.dumps(doc).encode()
    request.setHeader(b"content-length", b"%d" % len(body))
    return body
