"""A raw Server-Sent Events client on a plain TCP connection: it writes the
request itself and reads the response byte by byte (chunked or not), so
that the tests see exactly what RedMessenger sends, with no HTTP library
in between to smooth it over."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass, field

from harness import RECV_TIMEOUT
from network import HOST


@dataclass
class Event:
    type: str
    data: str
    id: str | None = None

    def json(self) -> dict:
        return json.loads(self.data)


@dataclass
class EventStreamClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    #: ``: ...`` comment lines seen so far (pings).
    comments: list[str] = field(default_factory=list)
    #: The last ``retry:`` field.
    retry: int | None = None
    _text: str = ""
    _pending: deque = field(default_factory=deque)
    _chunk_left: int = 0
    _ended: bool = False

    @classmethod
    async def open(cls, port: int, path: str, headers: dict[str, str] | None = None, *,
                   version: str = "HTTP/1.1", method: str = "GET", body: bytes = b"",
                   host: str = HOST) -> EventStreamClient:
        lines = [f"{method} {path} {version}", f"Host: {host}:{port}",
                 "Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        return await cls.send(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body, host)

    @classmethod
    async def send(cls, port: int, request: bytes, host: str = HOST) -> EventStreamClient:
        """Send ``request`` as it is, and read the answer's head."""
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        client = cls(reader, writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RECV_TIMEOUT)
        except BaseException:  # given up on (a timeout, a cancel): not left open
            writer.transport.abort()
            raise
        status_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
        client.status = int(status_line.split(" ")[1])
        for line in header_lines:
            name, _, value = line.partition(":")
            client.headers[name.strip().lower()] = value.strip()
        return client

    @property
    def chunked(self) -> bool:
        return self.headers.get("transfer-encoding") == "chunked"

    async def _more(self) -> bool:
        """Read more of the body into ``_text``; false at its end."""
        if self._ended:
            return False
        if not self.chunked:
            data = await self.reader.read(65536)
            if not data:
                self._ended = True
                return False
            self._text += data.decode()
            return True
        if self._chunk_left == 0:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                self._ended = True
                return False
            self._chunk_left = size
        data = await self.reader.read(self._chunk_left)
        if not data:
            raise AssertionError("the connection ended within a chunk")
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            assert await self.reader.readexactly(2) == b"\r\n"
        self._text += data.decode()
        return True

    async def body(self) -> bytes:
        """The whole body of an answer that is not a stream."""
        length = int(self.headers.get("content-length", "0"))
        return await asyncio.wait_for(self.reader.readexactly(length), RECV_TIMEOUT)

    async def _block(self) -> bool:
        """Read and parse one more block (an event, or comments): false at
        the end of the stream."""
        while True:
            block, sep, rest = self._text.partition("\n\n")
            if sep:
                self._text = rest
                event = self._parse(block)
                if event is not None:
                    self._pending.append(event)
                return True
            if not await self._more():
                return False

    async def event(self, timeout: float = RECV_TIMEOUT) -> Event | None:
        """The next event (comments are kept in ``comments``), or ``None``
        once the stream has ended."""
        async def next_event() -> Event | None:
            while not self._pending:
                if not await self._block():
                    return None
            return self._pending.popleft()

        return await asyncio.wait_for(next_event(), timeout)

    async def pings(self, count: int, timeout: float = RECV_TIMEOUT) -> None:
        """Read on until ``count`` comments have come; events that come
        meanwhile are kept for ``event()``."""
        async def read_on() -> None:
            while len(self.comments) < count:
                assert await self._block(), "the stream ended"

        await asyncio.wait_for(read_on(), timeout)

    def _parse(self, block: str) -> Event | None:
        kind, data, event_id = "message", [], None
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "":
                self.comments.append(value)
            elif name == "event":
                kind = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
            elif name == "retry":
                self.retry = int(value)
        if not data:
            return None
        return Event(kind, "\n".join(data), event_id)

    async def events(self, count: int, timeout: float = RECV_TIMEOUT) -> list[Event]:
        found = []
        for _ in range(count):
            event = await self.event(timeout)
            assert event is not None, f"the stream ended after {len(found)} of {count} events"
            found.append(event)
        return found

    async def ended(self, timeout: float = RECV_TIMEOUT) -> list[Event]:
        """Every event until the stream ends."""
        found = []
        while (event := await self.event(timeout)) is not None:
            found.append(event)
        return found

    def abort(self) -> None:
        """Drop the connection (RST), as a network gone would."""
        self.writer.transport.abort()
