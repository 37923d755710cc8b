"""A message as RedMessenger keeps it: the published payload plus the id,
source and receive time that must survive being stored and drained."""

from __future__ import annotations

import base64
import itertools
import json
import uuid
from dataclasses import dataclass, field


class MessageIds:
    """Ids unique across processes and restarts (a random boot id) that cost
    a counter increment per message."""

    def __init__(self) -> None:
        self._boot = uuid.uuid4().hex[:16]
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._boot}-{next(self._counter):x}"


@dataclass(eq=False)
class Envelope:
    id: str
    source: str
    #: Milliseconds since the epoch when RedMessenger received the PUBLISH.
    timestamp: int
    payload: bytes
    #: Whether this one came out of the stored queue.
    queued: bool = False
    #: When this process received it (``time.time()``), for the latency
    #: metric; 0 for one read back from a queue.
    received: float = 0.0
    _frames: dict = field(default_factory=dict, repr=False)

    def _payload_fields(self) -> dict:
        try:
            return {"payload": self.payload.decode("utf-8")}
        except UnicodeDecodeError:
            return {"payload_base64": base64.b64encode(self.payload).decode("ascii")}

    def stored(self) -> bytes:
        """The JSON kept in ``rm:users:<uid>:messages``."""
        return json.dumps({"id": self.id, "source": self.source,
                           "timestamp": self.timestamp, **self._payload_fields()},
                          separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def frame(self, bubble: bool, tag: int | None = None) -> bytes:
        """The ``message`` frame for one socket. Frames without a tag are the
        same for every socket, so they are built once per message."""
        key = (bubble, tag)
        if tag is None and key in self._frames:
            return self._frames[key]
        body = {"type": "message", "id": self.id, "source": self.source,
                "timestamp": self.timestamp, **self._payload_fields(),
                "bubble": bubble, "queued": self.queued}
        if tag is not None:
            body["tag"] = tag
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if tag is None:
            self._frames[key] = data
        return data

    @classmethod
    def from_stored(cls, raw: bytes, default_source: str, new_id: MessageIds,
                    now_ms: int) -> Envelope:
        """Read a queue entry. An entry that is not one of our envelopes (a raw
        string another program ``RPUSH``ed) is delivered as its own payload,
        never dropped."""
        try:
            doc = json.loads(raw)
            if (isinstance(doc, dict) and isinstance(doc.get("id"), str)
                    and isinstance(doc.get("source"), str)
                    and isinstance(doc.get("timestamp"), int)):
                if isinstance(doc.get("payload"), str):
                    payload = doc["payload"].encode("utf-8")
                else:
                    payload = base64.b64decode(doc["payload_base64"], validate=True)
                return cls(doc["id"], doc["source"], doc["timestamp"], payload, queued=True)
        except (ValueError, KeyError, TypeError, UnicodeError):
            pass
        return cls(new_id(), default_source, now_ms, raw, queued=True)
