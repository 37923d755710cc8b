"""The WebSocket protocol's frames and close codes (see docs/protocol.rst):
parsing what clients send, building what the server answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Close:
    """Close codes, each sent after an ``error`` frame saying why."""

    BAD_HELLO = 4000
    UNAUTHORIZED = 4001
    BAD_FRAME = 4002
    HELLO_TIMEOUT = 4008
    TOO_MANY_SOCKETS = 4009
    TOO_SLOW = 4010
    RATE_LIMITED = 4029
    BINARY_FRAME = 1003
    FRAME_TOO_BIG = 1009
    GOING_AWAY = 1001
    TRY_AGAIN_LATER = 1013


#: Close codes after which a client must not reconnect (docs/protocol.rst,
#: "Clients that behave"): the same hello would be refused again (4000,
#: 4001), the client broke the protocol (4002, and the WebSocket protocol
#: errors 1002, 1003, 1007, 1008, 1009, 1010), or another socket of the same
#: user replaced this one (4009: coming back would close that one in turn).
#: static/redmessenger.js has the same list (tests/test_formats.py checks).
FINAL_CLOSE_CODES = frozenset({
    Close.BAD_HELLO, Close.UNAUTHORIZED, Close.BAD_FRAME, Close.TOO_MANY_SOCKETS,
    1002, Close.BINARY_FRAME, 1007, 1008, Close.FRAME_TOO_BIG, 1010})
#: The ``error`` codes sent before those closes: final whatever the close
#: code says, for when the close frame itself is lost.
FINAL_ERRORS = frozenset({"bad_hello", "unauthorized", "bad_frame", "too_many_sockets",
                          "binary_frame", "frame_too_big"})


class ProtocolError(Exception):
    """A client frame we refuse; ``code``/``error`` go in the error frame.
    ``detail`` is for the log only: what the client must not learn."""

    def __init__(self, close_code: int, error: str, reason: str,
                 detail: str | None = None) -> None:
        super().__init__(reason)
        self.close_code = close_code
        self.error = error
        self.reason = reason
        self.detail = detail

    @property
    def logged(self) -> str:
        """The reason as the log says it."""
        return self.reason if self.detail is None else f"{self.reason} ({self.detail})"


#: A user id is what follows ``rm.users.`` in a channel name: no whitespace
#: or control characters, and short enough to be a sane Redis key.
MAX_ID_LENGTH = 256


def valid_id(name: object) -> bool:
    """Whether ``name`` is a user (or group) id a hello may carry: 1 to
    ``MAX_ID_LENGTH`` printable characters, no whitespace."""
    return (isinstance(name, str) and 0 < len(name) <= MAX_ID_LENGTH
            and not any(c.isspace() or not c.isprintable() for c in name))


@dataclass(frozen=True)
class Hello:
    id: str
    key: str | None = None
    ack: bool = False
    #: Send ``heartbeat`` frames: a browser's script cannot see pings.
    heartbeat: bool = False


def parse_hello(data: bytes) -> Hello:
    """The first frame: ``{"id": ..., "key": ..., "ack": ..., "heartbeat": ...}``,
    or the plain-text form ``user1`` / ``user1:token`` for simple clients."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_hello("hello is not valid UTF-8") from None
    if text.lstrip().startswith("{"):
        doc = _load(text, _bad_hello, "hello")
        uid, key = doc.get("id"), doc.get("key")
        ack, heartbeat = doc.get("ack", False), doc.get("heartbeat", False)
        if key is not None and not isinstance(key, str):
            raise _bad_hello('"key" must be a string')
        for name, value in (("ack", ack), ("heartbeat", heartbeat)):
            if not isinstance(value, bool):
                raise _bad_hello(f'"{name}" must be true or false')
    else:
        uid, _, key = text.partition(":")
        key, ack, heartbeat = (key if _ else None), False, False
    if not isinstance(uid, str) or not uid:
        raise _bad_hello('hello needs a non-empty string "id"')
    if not valid_id(uid):
        raise _bad_hello(f'"id" must be at most {MAX_ID_LENGTH} printable characters '
                         "without spaces")
    return Hello(uid, key, ack, heartbeat)


def parse_ack(data: bytes) -> int:
    """``{"type": "ack", "tag": N}``: everything up to tag N was received."""
    doc = _load(data, _bad_frame, "frame")
    if not isinstance(doc, dict) or doc.get("type") != "ack":
        raise _bad_frame('after the hello only {"type": "ack", "tag": N} frames are accepted')
    tag = doc.get("tag")
    if not isinstance(tag, int) or isinstance(tag, bool) or tag < 0:
        raise _bad_frame('"tag" must be a non-negative integer')
    return tag


def _load(data: str | bytes, refusal: Callable[[str], ProtocolError], what: str) -> Any:
    """JSON from a client, or the refusal that says why not."""
    try:
        return json.loads(data)
    except ValueError:
        raise refusal(f"{what} is not valid JSON") from None
    except RecursionError:
        # Python's parser gives up on JSON nested a thousand deep or so.
        raise refusal(f"{what} is nested too deeply") from None


def _bad_hello(reason: str) -> ProtocolError:
    return ProtocolError(Close.BAD_HELLO, "bad_hello", reason)


def _bad_frame(reason: str) -> ProtocolError:
    return ProtocolError(Close.BAD_FRAME, "bad_frame", reason)


def welcome(uid: str, channel: str, queued: int, ack: bool,
            heartbeat: float | None = None) -> bytes:
    """``heartbeat`` (seconds between heartbeats, 0 for none) only for a
    hello that asked: other clients get the welcome they always got."""
    doc = {"type": "welcome", "id": uid, "channel": channel, "queued": queued, "ack": ack}
    if heartbeat is not None:
        doc["heartbeat"] = int(heartbeat) if float(heartbeat).is_integer() else heartbeat
    return _dump(doc)


#: Sent every --ping-interval to a socket whose hello asked for it.
HEARTBEAT = b'{"type":"heartbeat"}'


def error(code: str, reason: str) -> bytes:
    return _dump({"type": "error", "code": code, "reason": reason})


def _dump(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
