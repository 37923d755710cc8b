"""A message as RedMessenger keeps it: the published payload plus the id,
source and receive time that must survive being stored and drained.

The stored form is JSON with a fixed layout, and a ``message`` frame is that
same JSON with a few fields around it: each message is serialized once, and
a drained one is sent without being parsed and serialized again.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import uuid
import weakref


class MessageIds:
    """Ids unique across processes and restarts (a random boot id) that cost
    a counter increment per message. A forked child (gunicorn ``--preload``,
    celery prefork) gets a boot id of its own: the parent's would give the
    same ids twice."""

    def __init__(self) -> None:
        self._reseed()
        _every_generator.add(self)

    def _reseed(self) -> None:
        self._boot = uuid.uuid4().hex[:16]
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._boot}-{next(self._counter):x}"


_every_generator: weakref.WeakSet[MessageIds] = weakref.WeakSet()


def _reseed_after_fork() -> None:
    for ids in list(_every_generator):
        ids._reseed()


if hasattr(os, "register_at_fork"):  # not on Windows, which cannot fork either
    os.register_at_fork(after_in_child=_reseed_after_fork)


# "Unrolled" so that it never backtracks: linear even on hostile input.
_STRING = r'"([^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*)"'
#: Exactly what ``Envelope.stored()`` writes: valid JSON with our fields in
#: our order, so it can be spliced into a frame as it is.
_BASE64 = r'"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"'
_CANONICAL = re.compile(
    r'\{"id":' + _STRING + r',"source":' + _STRING + r',"timestamp":(-?\d{1,17}),'
    r'(?:"payload":' + _STRING.replace("(", "(?:", 1) + r'|"payload_base64":' + _BASE64
    + r")\}")


_quote = json.encoder.encode_basestring
#: Where a ``message`` frame's id begins: after ``{"type":"message","id":``.
_FRAME_ID = len(b'{"type":"message","id":')


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    value = json.loads(f'"{text}"')
    value.encode("utf-8")  # an escaped lone surrogate is not text: not our envelope
    return value


class Envelope:
    __slots__ = ("id", "source", "timestamp", "_payload", "queued", "received", "_stored",
                 "_bubbling", "_quiet")

    def __init__(self, id: str, source: str, timestamp: int, payload: bytes, *,
                 queued: bool = False, received: float = 0.0) -> None:
        self.id = id
        self.source = source
        #: Milliseconds since the epoch when RedMessenger received the PUBLISH.
        self.timestamp = timestamp
        self._payload = payload
        #: Whether this one came out of the stored queue.
        self.queued = queued
        #: When this process received it (``time.time()``), for the latency
        #: metric; 0 for one read back from a queue.
        self.received = received
        self._stored: bytes | None = None
        self._bubbling: bytes | None = None
        self._quiet: bytes | None = None

    def __repr__(self) -> str:
        return f"<Envelope {self.id} from {self.source}>"

    @property
    def payload(self) -> bytes:
        if self._payload is None:
            doc = json.loads(self._stored)
            # surrogatepass: the frame, spliced from the stored JSON, carries an
            # escaped lone surrogate as it is; so does this.
            self._payload = (doc["payload"].encode("utf-8", "surrogatepass") if "payload" in doc
                             else base64.b64decode(doc["payload_base64"]))
        return self._payload

    def stored(self) -> bytes:
        """The JSON kept in ``rm:users:<uid>:messages``."""
        if self._stored is None:
            # json.dumps(..., separators=(",", ":"), ensure_ascii=False) to
            # the byte, built from json's own C string encoder: a third of
            # the cost of dumps() on a dict.
            try:
                payload = '"payload":' + _quote(self._payload.decode("utf-8"))
            except UnicodeDecodeError:
                payload = ('"payload_base64":"'
                           + base64.b64encode(self._payload).decode("ascii") + '"')
            self._stored = (f'{{"id":{_quote(self.id)},"source":{_quote(self.source)},'
                            f'"timestamp":{self.timestamp:d},{payload}}}').encode()
        return self._stored

    @staticmethod
    def stored_start(id: str) -> bytes:
        """How ``stored()`` begins for a message of this id: what went back
        to a queue is found by it."""
        return f'{{"id":{_quote(id)},'.encode()

    @staticmethod
    def id_in_frame(frame: bytes) -> str:
        """The id of a ``message`` frame, which ``frame()`` puts first. The
        id's JSON string ends at the first ``","source":`` (a quote within
        it is escaped), so the payload is not read."""
        return json.loads(frame[_FRAME_ID:frame.index(b'","source":', _FRAME_ID) + 1])

    @staticmethod
    def tag_in_frame(frame: bytes) -> int:
        """The tag of an ack-mode socket's ``message`` frame: its last field."""
        return int(frame[frame.rindex(b":") + 1:-1])

    def frame(self, bubble: bool, tag: int | None = None) -> bytes:
        """The ``message`` frame for one socket. Frames without a tag are the
        same for every socket, so they are built once per message."""
        if tag is None:
            cached = self._bubbling if bubble else self._quiet
            if cached is not None:
                return cached
        frame = b"".join((b'{"type":"message",', self.stored()[1:-1],
                          b',"bubble":true' if bubble else b',"bubble":false',
                          b',"queued":true' if self.queued else b',"queued":false',
                          b"}" if tag is None else b',"tag":%d}' % tag))
        if tag is None:
            if bubble:
                self._bubbling = frame
            else:
                self._quiet = frame
        return frame

    @classmethod
    def from_stored(cls, raw: bytes, default_source: str, new_id: MessageIds,
                    now_ms: int) -> Envelope:
        """Read a queue entry. An entry that is not one of our envelopes (a raw
        string another program ``RPUSH``ed) is delivered as its own payload,
        never dropped; so is one that fails to parse in any other way (JSON
        nested too deep for the parser, say): no entry can stop a drain."""
        try:
            envelope = cls._parse(raw)
        except Exception:
            envelope = None
        if envelope is None:
            return cls(new_id(), default_source, now_ms, raw, queued=True)
        return envelope

    @classmethod
    def _parse(cls, raw: bytes) -> Envelope | None:
        """Our envelope as written by ``stored()``, else one written some
        other way (spacing, key order), else ``None``."""
        text = raw.decode("utf-8")
        match = _CANONICAL.fullmatch(text)
        if match is not None:
            envelope = cls(_unescape(match[1]), _unescape(match[2]), int(match[3]), None,
                           queued=True)
            envelope._stored = raw
            return envelope
        doc = json.loads(text)
        if not (isinstance(doc, dict) and isinstance(doc.get("id"), str)
                and isinstance(doc.get("source"), str)
                and isinstance(doc.get("timestamp"), int)):
            return None
        if isinstance(doc.get("payload"), str):
            payload = doc["payload"].encode("utf-8")
        else:
            payload = base64.b64decode(doc["payload_base64"], validate=True)
        envelope = cls(doc["id"], doc["source"], doc["timestamp"], payload, queued=True)
        envelope.stored()  # fails here, not in a drain, if it cannot be written back
        return envelope
