"""The load client: many WebSocket connections in one asyncio process, each
identified with a hello, counting and checking every message frame.

A minimal hand-written WebSocket client (RFC 6455: handshake, masked client
frames, unfragmented or fragmented server frames), because counting frames
is all it does and it has to stay well ahead of the server it measures: it
parses frames straight out of each read and looks only at the fields it
checks, about 4x less CPU per message than the ``websockets`` client (see
README.rst). It answers pings, acknowledges in ack mode (one cumulative ack
per read that brought messages) and records, per user, how many messages
came and the sum of their sequence numbers; a sequence number that is not
larger than the one before on the same socket is an order error.

Commands (JSON lines on stdin) and their answers (on stdout)::

    {"cmd": "open", "port": P, "uids": [...], "ack": false, "concurrency": 50,
     "latency": false, "timeout": 60, "withhold": false}
                                                 -> {"event": "opened", ...}
    {"cmd": "wait", "total": N, "timeout": 60, "settle": 0.2}
                                                 -> {"event": "waited", ...}
    {"cmd": "failover", "port": P, "jitter": 1.0}
                                                 -> {"event": "armed", ...}
    {"cmd": "reconnected", "timeout": 60}        -> {"event": "reconnected", ...}
    {"cmd": "rejoin", "uids": [...], "timeout": 30}
                                                 -> {"event": "rejoined", ...}
    {"cmd": "close"}                             -> {"event": "closed"}

``port`` may be a list: the users are spread over the ports, round-robin
(nodes of one cluster). ``withhold`` keeps ack-mode sockets from acking,
so what they got stays in flight. After ``failover``, a socket the server
drops connects again to ``port`` after a random delay of up to ``jitter``
seconds, says hello as before (and acks from then on), and counts for its
user; ``reconnected`` waits until every socket is welcomed again. ``rejoin``
closes users' sockets and connects them again there: their next connect.

End of stdin closes everything and exits.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import resource
import socket
import sys
import time
from array import array

from .wire import emit

HOST = "127.0.0.1"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MESSAGE = b'{"type":"message"'
PAYLOAD = b'"payload":"'
TAG = b'"tag":'
#: How long a reconnecting socket waits for its welcome before it tries
#: again: past a dead node's lease (3 s) and a tick (1 s), so that a welcome
#: held back until the storer is taken over still comes in time.
WELCOME_TIMEOUT = 8.0


def client_frame(data: bytes, opcode: int = 0x1) -> bytes:
    """A masked frame, as a client must send it."""
    mask = os.urandom(4)
    size = len(data)
    if size < 126:
        header = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    if not size:
        return header + mask
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "big")
    return header + mask + (int.from_bytes(data, "big") ^ key).to_bytes(size, "big")


class Connection(asyncio.Protocol):
    """One WebSocket: handshake, hello, welcome, then message frames."""

    def __init__(self, client: Client, uid: str, ack: bool, port: int,
                 acking: bool = True) -> None:
        self.client = client
        self.uid = uid
        self.ack = ack
        #: Whether it acks what it gets (an ack-mode socket may withhold).
        self.acking = ack and acking
        self.port = port
        self.transport = None
        self.upgraded = False
        self.key = base64.b64encode(os.urandom(16))
        self.buffer = b""
        self.fragments: list[bytes] = []
        self.welcome: dict | None = None
        self.welcomed = asyncio.get_running_loop().create_future()
        self.last_seq = -1
        self.count = 0
        self.seqsum = 0
        self.t_hello = 0.0
        self.close_code: int | None = None
        #: Closed by the client itself, to connect again (``rejoin``).
        self.leaving = False

    # -- asyncio ------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(b"GET / HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                        b"Sec-WebSocket-Version: 13\r\n\r\n"
                        % (HOST.encode(), self.port, self.key))

    def connection_lost(self, exc) -> None:
        self.client.open_connections.discard(self)
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(
                f"{self.uid}: connection lost before the welcome ({exc})"))
        elif not self.client.closing and not self.leaving:
            self.client.dropped(self)

    def data_received(self, data: bytes) -> None:
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        if not self.upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = data
                return
            self._upgraded(data[:end])
            data = data[end + 4:]
            if not data:
                return
        self._frames(data)

    # -- the handshake ------------------------------------------------------

    def _upgraded(self, head: bytes) -> None:
        accept = base64.b64encode(hashlib.sha1(self.key + GUID).digest())
        if not head.startswith(b"HTTP/1.1 101") or accept not in head:
            self._fail(f"handshake refused: {head[:200]!r}")
            return
        self.upgraded = True
        hello = {"id": self.uid, "ack": True} if self.ack else {"id": self.uid}
        self.t_hello = time.monotonic()
        self.transport.write(client_frame(json.dumps(hello).encode()))

    def _fail(self, why: str) -> None:
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(f"{self.uid}: {why}"))
        else:
            self.client.errors.append(f"{self.uid}: {why}")
        self.transport.abort()

    # -- frames -------------------------------------------------------------

    def _frames(self, data: bytes) -> None:
        size = len(data)
        pos = 0
        count = 0
        seqsum = 0
        last = self.last_seq
        tag = -1
        latencies = self.client.latencies
        now_ns = time.monotonic_ns() if latencies is not None else 0
        while size - pos >= 2:
            first = data[pos]
            length = data[pos + 1] & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if size - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            else:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            pos = end
            if first == 0x81 and data.startswith(MESSAGE, start):
                i = data.find(PAYLOAD, start, end) + 11
                j = data.find(b":", i, end)
                seq = int(data[i:j])
                if seq <= last:
                    self.client.order_errors += 1
                last = seq
                count += 1
                seqsum += seq
                if latencies is not None:
                    latencies.append(now_ns - int(data[j + 1:data.find(b":", j + 1, end)]))
                if self.acking:
                    t = data.rfind(TAG, start, end)
                    tag = int(data[t + 6:end - 1])
            else:
                self._other(first, data[start:end])
        if pos < size:
            self.buffer = data[pos:]
        if count:
            self.last_seq = last
            self.count += count
            self.seqsum += seqsum
            if tag >= 0:
                self.transport.write(client_frame(b'{"type":"ack","tag":%d}' % tag))
            self.client.received_some(count)

    def _other(self, first: int, body: bytes) -> None:
        opcode = first & 0x0F
        if opcode == 0x9:
            self.transport.write(client_frame(body, 0xA))
            return
        if opcode == 0xA:
            return
        if opcode == 0x8:
            self.close_code = int.from_bytes(body[:2], "big") if len(body) >= 2 else None
            self.client.errors.append(f"{self.uid}: closed by the server with "
                                      f"{self.close_code}: {body[2:].decode(errors='replace')}")
            self.transport.close()
            return
        if not first & 0x80 or opcode == 0x0:
            self.fragments.append(body)
            if not first & 0x80:
                return
            body, self.fragments = b"".join(self.fragments), []
            if body.startswith(MESSAGE):
                # A fragmented message frame: rare, so the slow way.
                self._frames(bytes((0x81, 127)) + len(body).to_bytes(8, "big") + body)
                return
        self._control(body)

    def _control(self, body: bytes) -> None:
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("type") == "welcome" and self.welcome is None:
            self.welcome = doc
            self.client.welcomed(self)
            return
        self.client.other_frames += 1
        if len(self.client.errors) < 20:
            self.client.errors.append(f"{self.uid}: unexpected frame {body[:200]!r}")


class Client:
    def __init__(self, connection_type: type = Connection) -> None:
        #: What each user's connection is (eventsclient: an event stream).
        self.connection_type = connection_type
        self.connections: list[Connection] = []
        self.open_connections: set[Connection] = set()
        self.latencies: array | None = None
        self.received = 0
        self.order_errors = 0
        self.other_frames = 0
        self.lost = 0
        self.closing = False
        self.errors: list[str] = []
        self.t_first_message = 0.0
        self.t_last_message = 0.0
        self.t_last_welcome = 0.0
        self.target = 0
        self.t_target = 0.0
        self.reached: asyncio.Future | None = None
        #: After ``failover``: where dropped sockets go, how many must come
        #: back, and how it goes.
        self.failover_port = 0
        self.jitter = 0.0
        self.to_reconnect = 0
        self.rewelcomed = 0
        #: Failed reconnect attempts (each tried again), and a few of why.
        self.retries = 0
        self.reconnect_errors: list[str] = []
        self.t_first_drop = 0.0
        self.all_back: asyncio.Future | None = None
        self.reconnecting: set[asyncio.Task] = set()

    # -- events from connections --------------------------------------------

    def welcomed(self, connection: Connection) -> None:
        self.t_last_welcome = time.monotonic()
        if not connection.welcomed.done():
            connection.welcomed.set_result(None)

    def dropped(self, connection: Connection) -> None:
        """The server dropped a welcomed socket: lost, or after ``failover``
        connected again elsewhere after a random delay."""
        if not self.failover_port:
            self.lost += 1
            return
        self.t_first_drop = self.t_first_drop or time.monotonic()
        task = asyncio.get_running_loop().create_task(
            self._reconnect(connection, random.uniform(0, self.jitter)))
        self.reconnecting.add(task)
        task.add_done_callback(self.reconnecting.discard)

    async def _connect(self, uid: str, ack: bool, port: int, acking: bool = True) -> Connection:
        """A socket of the user, once welcomed (OSError or ConnectionError if not)."""
        _, connection = await asyncio.get_running_loop().create_connection(
            lambda: self.connection_type(self, uid, ack, port, acking), HOST, port)
        self.connections.append(connection)
        self.open_connections.add(connection)
        try:
            await connection.welcomed
        except asyncio.CancelledError:  # given up on: it must not linger
            connection.leaving = True
            connection.transport.abort()
            raise
        return connection

    async def _reconnect(self, old: Connection, delay: float) -> None:
        """Connect again after ``delay``; an attempt that fails, or is not
        welcomed within ``WELCOME_TIMEOUT``, is tried again after another
        random delay, as a client library would, until the client closes."""
        while True:
            await asyncio.sleep(delay)
            if self.closing:
                return
            try:
                await asyncio.wait_for(self._connect(old.uid, old.ack, self.failover_port),
                                       WELCOME_TIMEOUT)
                break
            except (OSError, ConnectionError, asyncio.TimeoutError) as e:
                self.retries += 1
                if len(self.reconnect_errors) < 10:
                    self.reconnect_errors.append(f"{old.uid}: {e}")
                delay = random.uniform(0, self.jitter)
        self.rewelcomed += 1
        if (self.all_back is not None and not self.all_back.done()
                and self.rewelcomed >= self.to_reconnect):
            self.all_back.set_result(None)

    def received_some(self, count: int) -> None:
        now = time.monotonic()
        if not self.received:
            self.t_first_message = now
        self.received += count
        self.t_last_message = now
        if self.target and not self.t_target and self.received >= self.target:
            self.t_target = now
            if self.reached is not None and not self.reached.done():
                self.reached.set_result(None)

    # -- commands -------------------------------------------------------------

    async def open(self, port: int | list[int], uids: list[str], ack: bool = False,
                   concurrency: int = 50, latency: bool = False, timeout: float = 60.0,
                   withhold: bool = False) -> dict:
        ports = port if isinstance(port, list) else [port]
        if latency:
            self.latencies = array("q")
        gate = asyncio.Semaphore(concurrency)
        failures: list[str] = []
        #: This call's sockets (the client may hold others already).
        opened: list[Connection] = []

        async def one(uid: str, port: int) -> None:
            async with gate:
                try:
                    opened.append(await self._connect(uid, ack, port, not withhold))
                except (OSError, ConnectionError) as e:
                    failures.append(f"{uid}: {e}")

        t_first = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.gather(
                *(one(uid, ports[i % len(ports)]) for i, uid in enumerate(uids))), timeout)
        except asyncio.TimeoutError:
            failures.append(f"timed out after {timeout:g} s opening connections")
        welcomed = opened
        return {"event": "opened", "welcomed": len(welcomed), "failed": len(failures),
                "errors": failures[:10], "t_first": t_first,
                "t_last": self.t_last_welcome, "t_first_hello": min(
                    (c.t_hello for c in welcomed), default=0.0),
                "queued": sum(c.welcome.get("queued", 0) for c in welcomed)}

    async def wait(self, total: int, timeout: float, settle: float = 0.0,
                   latency_file: str | None = None) -> dict:
        # A later wait (for more) has a target and a time of its own.
        self.target, self.t_target = total, 0.0
        if self.received >= total:
            self.t_target = self.t_last_message
        else:
            self.reached = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.reached, timeout)
            except asyncio.TimeoutError:
                pass
        if settle:
            await asyncio.sleep(settle)
        if latency_file and self.latencies is not None:
            with open(latency_file, "wb") as f:
                self.latencies.tofile(f)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"event": "waited", "received": self.received, "reached": bool(self.t_target),
                "t_target": self.t_target, "t_first_message": self.t_first_message,
                "t_last_message": self.t_last_message, "order_errors": self.order_errors,
                "other_frames": self.other_frames, "lost": self.lost,
                "errors": self.errors[:10],
                "per_user": self.per_user(),
                "latencies": len(self.latencies) if self.latencies is not None else None,
                "cpu": usage.ru_utime + usage.ru_stime}

    def per_user(self) -> dict[str, list[int]]:
        """Each user's count and sum of sequence numbers, over its sockets."""
        found: dict[str, list[int]] = {}
        for c in self.connections:
            counted = found.setdefault(c.uid, [0, 0])
            counted[0] += c.count
            counted[1] += c.seqsum
        return found

    async def failover(self, port: int, jitter: float) -> dict:
        """From now on, a socket the server drops connects again to ``port``."""
        self.failover_port, self.jitter = port, jitter
        self.to_reconnect = len(self.open_connections)
        return {"event": "armed", "sockets": self.to_reconnect}

    async def reconnected(self, timeout: float) -> dict:
        """Once every socket dropped since ``failover`` is welcomed again,
        or at the deadline."""
        if self.rewelcomed < self.to_reconnect:
            self.all_back = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.all_back, timeout)
            except asyncio.TimeoutError:
                pass
        return {"event": "reconnected", "sockets": self.to_reconnect,
                "reconnected": self.rewelcomed, "retries": self.retries,
                "errors": self.reconnect_errors, "t_first_drop": self.t_first_drop,
                "t_last_welcome": self.t_last_welcome}

    async def rejoin(self, uids: list[str], timeout: float) -> dict:
        """These users' next connect: their sockets close, and they connect
        again (to the ``failover`` port) and say hello."""
        wanted = set(uids)
        for connection in [c for c in self.open_connections if c.uid in wanted]:
            connection.leaving = True
            connection.transport.close()
        ack = {c.uid: c.ack for c in self.connections}
        try:
            await asyncio.wait_for(asyncio.gather(
                *(self._connect(uid, ack[uid], self.failover_port) for uid in uids)), timeout)
        except (OSError, ConnectionError, asyncio.TimeoutError) as e:
            return {"event": "rejoined", "ok": False, "error": repr(e)}
        return {"event": "rejoined", "ok": True}

    async def close(self) -> dict:
        self.closing = True
        for connection in list(self.open_connections):
            connection.transport.close()
        deadline = time.monotonic() + 10
        while self.open_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return {"event": "closed", "left": len(self.open_connections)}


async def main(connection_type: type = Connection, client_type: type | None = None) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    client = (client_type or Client)(connection_type)
    while True:
        line = await reader.readline()
        if not line:
            break
        command = json.loads(line)
        name = command.pop("cmd")
        try:
            emit(await getattr(client, name)(**command))
        except Exception as e:  # tell the coordinator, which stops the scenario
            emit({"event": "error", "error": f"{name}: {e!r}"})
    await client.close()


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    asyncio.run(main())
