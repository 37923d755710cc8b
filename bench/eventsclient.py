"""The load client for Server-Sent Events: ``wsclient``'s commands and
counting, each user's connection an event stream (``GET /events``) instead
of a WebSocket. A stream is always in ack mode: the messages each read
brought are acknowledged with one ``POST /events/ack`` (the id of the last
of them), on a keep-alive connection of the stream's own, one request in
flight at a time, as a client that acknowledges as it goes would. A
stream the server ends (its ack window full for a second: the acks fell
behind) is resumed at once as a browser's EventSource would, with
``Last-Event-ID``; its messages count with its user's, and one that comes
twice or out of order across the resume is an order error.

Like wsclient, it parses what it reads by hand (HTTP/1.1 chunks, then
events) and looks only at what it checks, so that it stays well ahead of
the server it measures.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

from . import wsclient
from .wsclient import HOST, PAYLOAD, Client

#: Where an event's id begins, and its data.
EVENT_ID = b"\nid: "
DATA = b"data: "


class EventConnection(wsclient.Connection):
    """One stream: its request, the welcome, then message events. What it
    shares with a WebSocket's connection (counting, failing) is wsclient's."""

    def __init__(self, client: Client, uid: str, ack: bool, port: int,
                 acking: bool = True, resumed: EventConnection | None = None) -> None:
        super().__init__(client, uid, True, port, acking)
        #: The stream this one resumes: from its last event, in its order.
        self.last_id = resumed.last_id if resumed is not None else None
        self.last_seq = resumed.last_seq if resumed is not None else -1
        self.head_done = False
        self.raw = b""  # chunked bytes not decoded yet
        self.text = b""  # decoded body not parsed into events yet
        self.ended = False
        self.acks: Acks | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.t_hello = time.monotonic()
        resume = b"Last-Event-ID: %s\r\n" % self.last_id if self.last_id else b""
        transport.write(b"GET /events?id=%s HTTP/1.1\r\nHost: %s:%d\r\n"
                        b"Accept: text/event-stream\r\n%s\r\n"
                        % (self.uid.encode(), HOST.encode(), self.port, resume))

    def connection_lost(self, exc) -> None:
        self.client.open_connections.discard(self)
        if self.acks is not None:
            self.acks.close()
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(
                f"{self.uid}: connection lost before the welcome ({exc})"))
        elif self.ended and not self.client.closing and not self.leaving:
            asyncio.get_running_loop().create_task(self._resume())
        elif not self.client.closing and not self.leaving:
            self.client.dropped(self)

    async def _resume(self) -> None:
        self.client.resumes += 1
        try:
            await self.client.connect_stream(self)
        except (OSError, ConnectionError) as e:
            self.client.errors.append(f"{self.uid}: could not resume: {e}")

    def data_received(self, data: bytes) -> None:
        raw = self.raw + data
        if not self.head_done:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                self.raw = raw
                return
            if not raw.startswith(b"HTTP/1.1 200"):
                self._fail(f"refused: {raw[:200]!r}")
                return
            self.head_done = True
            raw = raw[end + 4:]
        # Chunks: "<hex size>\r\n<data>\r\n".
        pos, size, body = 0, len(raw), []
        while True:
            line_end = raw.find(b"\r\n", pos)
            if line_end < 0:
                break
            length = int(raw[pos:line_end], 16)
            if length == 0:  # the server ended the stream
                self.ended = True
                break
            start = line_end + 2
            if start + length + 2 > size:
                break
            body.append(raw[start:start + length])
            pos = start + length + 2
        self.raw = raw[pos:]
        if body:
            self._events(self.text + b"".join(body))

    def _events(self, text: bytes) -> None:
        count = seqsum = 0
        last, last_id = self.last_seq, None
        pos = 0
        while True:
            end = text.find(b"\n\n", pos)
            if end < 0:
                break
            if text.startswith(b"event: message", pos):
                i = text.find(PAYLOAD, pos, end) + 11
                seq = int(text[i:text.find(b":", i, end)])
                if seq <= last:
                    self.client.order_errors += 1
                last = seq
                count += 1
                seqsum += seq
                j = text.find(EVENT_ID, pos, end) + len(EVENT_ID)
                last_id = self.last_id = text[j:text.find(b"\n", j)]
            elif text.startswith(b"event: welcome", pos):
                d = text.find(DATA, pos, end) + len(DATA)
                self.welcome = json.loads(text[d:end])
                self.client.welcomed(self)
            elif not text.startswith((b"retry:", b":"), pos):
                self.client.errors.append(f"{self.uid}: unexpected event "
                                          f"{text[pos:end][:200]!r}")
            pos = end + 2
        self.text = text[pos:]
        if count:
            self.last_seq = last
            self.count += count
            self.seqsum += seqsum
            if self.acking:
                if self.acks is None:
                    self.acks = Acks(self)
                self.acks.ack(last_id)
            self.client.received_some(count)


class Acks(asyncio.Protocol):
    """A stream's acks: ``POST /events/ack`` on one keep-alive connection,
    one at a time; an id that comes while one is in flight waits for it,
    and only the newest waiting one is sent (acks are cumulative). The
    server closes an HTTP connection --handshake-timeout after its accept:
    the next one carries on, sending again what was not answered."""

    def __init__(self, stream: EventConnection) -> None:
        self.stream = stream
        self.transport = None
        self.in_flight = True  # until connected
        self.waiting: bytes | None = None
        #: The id of the request in flight, sent again on a new connection.
        self.sent: bytes | None = None
        self.answers = b""
        self.closing = False
        self._connect()

    def _connect(self) -> None:
        async def connect() -> None:
            try:
                await asyncio.get_running_loop().create_connection(lambda: self, HOST,
                                                                   self.stream.port)
            except OSError as e:
                self.stream.client.errors.append(f"{self.stream.uid}: acks: {e}")

        asyncio.get_running_loop().create_task(connect())

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.in_flight = False
        self.answers = b""
        self._send()

    def connection_lost(self, exc) -> None:
        self.transport = None
        if self.waiting is None:
            self.waiting = self.sent
        self.in_flight, self.sent = False, None
        self._send()

    def ack(self, last_id: bytes) -> None:
        self.waiting = last_id
        self._send()

    def _send(self) -> None:
        if self.in_flight or self.waiting is None or self.closing:
            return
        if self.transport is None:  # the server closed the last one
            self.in_flight = True  # until connected
            self._connect()
            return
        body = b'{"id":"%s","last":"%s"}' % (self.stream.uid.encode(), self.waiting)
        self.sent, self.waiting = self.waiting, None
        self.in_flight = True
        self.transport.write(b"POST /events/ack HTTP/1.1\r\nHost: %s:%d\r\n"
                             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (HOST.encode(), self.stream.port, len(body), body))

    def data_received(self, data: bytes) -> None:
        answers = self.answers + data
        end = answers.find(b"\r\n\r\n")
        if end < 0:
            self.answers = answers
            return
        head = answers[:end]
        if not head.startswith(b"HTTP/1.1 200"):
            self.stream.client.errors.append(f"{self.stream.uid}: ack refused: {head[:200]!r}")
        length = int(head[head.lower().find(b"content-length:") + 15:].split(b"\r\n", 1)[0])
        if len(answers) < end + 4 + length:
            self.answers = answers
            return
        self.answers = answers[end + 4 + length:]
        self.in_flight, self.sent = False, None
        self._send()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


class EventsClient(Client):
    """wsclient's client, its connections event streams, which resume."""

    def __init__(self, connection_type: type = EventConnection) -> None:
        super().__init__(connection_type)
        #: Streams the server ended that were resumed.
        self.resumes = 0

    async def connect_stream(self, old: EventConnection) -> EventConnection:
        _, connection = await asyncio.get_running_loop().create_connection(
            lambda: EventConnection(self, old.uid, True, old.port, old.acking, old), HOST,
            old.port)
        self.connections.append(connection)
        self.open_connections.add(connection)
        await connection.welcomed
        return connection

    async def wait(self, *args, **kwargs) -> dict:
        return {**await super().wait(*args, **kwargs), "resumes": self.resumes}


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    asyncio.run(wsclient.main(EventConnection, EventsClient))
