"""Running a real RedMessenger in the test's reactor, and talking to it with
real WebSocket clients (the ``websockets`` library, not Autobahn, so that a
protocol mistake shared by our server and Autobahn cannot hide).

Tests are asyncio coroutines decorated with ``@aiotest``: the reactor is
Twisted's asyncio reactor (setup.cfg), so server and clients share one loop.
Twisted Deferreds are awaited with ``await tw(d)``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import pytest_twisted
import websockets
from twisted.internet import defer

#: No single test waits longer than this for anything.
TEST_TIMEOUT = 60.0
#: How long a client waits for a frame it expects.
RECV_TIMEOUT = 10.0


def loop() -> asyncio.AbstractEventLoop:
    from twisted.internet import reactor

    return reactor._asyncioEventloop


def aiotest(fn: Callable[..., Awaitable[Any]] | None = None, *,
            timeout: float = TEST_TIMEOUT) -> Any:
    """Run an asyncio coroutine test on the reactor's loop, bounded in time
    (``@aiotest(timeout=0)``: the test bounds itself)."""
    if fn is None:
        return functools.partial(aiotest, timeout=timeout)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        coro = fn(*args, **kwargs)
        if timeout:
            coro = asyncio.wait_for(coro, timeout)
        return defer.Deferred.fromFuture(asyncio.ensure_future(coro, loop=loop()))

    return wrapper


def run(coro: Awaitable[Any]) -> Any:
    """Block a (synchronous) fixture until a coroutine is done."""
    d = defer.Deferred.fromFuture(asyncio.ensure_future(
        asyncio.wait_for(coro, TEST_TIMEOUT), loop=loop()))
    return pytest_twisted.blockon(d)


def tw(d: defer.Deferred) -> asyncio.Future:
    """Await a Twisted Deferred from a coroutine."""
    return d.asFuture(loop())


async def eventually(check: Callable[[], Any], timeout: float = RECV_TIMEOUT,
                     what: str = "condition") -> Any:
    """Poll ``check`` until it returns something true, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


class RunningService:
    """A RedMessengerService started in this process on a free port."""

    def __init__(self, service, redis) -> None:
        self.service = service
        self.redis = redis
        #: A second node, beside one that stores for offline users (see the
        #: ``messenger`` fixture).
        self.beside_a_storer = False
        port = service.port.getHost().port
        scheme = "wss" if service.settings.port.startswith("ssl:") else "ws"
        self.url = f"{scheme}://127.0.0.1:{port}/"
        self.clients: list[Client] = []

    @property
    def dispatcher(self):
        return self.service.dispatcher

    async def connect(self, **kwargs) -> Client:
        client = await Client.connect(self.url, **kwargs)
        self.clients.append(client)
        return client

    def drop_clients(self) -> None:
        """Cut every client's connection: after a test, a client that
        stopped reading would hold the service's stop for its close
        timeout."""
        for client in self.clients:
            client.abort()

    async def user(self, uid: str, key: str | None = None, ack: bool = False,
                   **connect) -> Client:
        """A connected client whose hello was welcomed."""
        client = await self.connect(**connect)
        client.welcome = await client.hello(uid, key=key, ack=ack)
        return client

    def publish(self, channel: str, payload: str | bytes) -> int:
        return self.redis.command("PUBLISH", channel, payload)

    def queue(self, uid: str) -> list[dict]:
        """The user's stored queue, decoded."""
        return [json.loads(raw) for raw in self.redis.command(
            "LRANGE", f"rm:users:{uid}:messages", 0, -1)]

    async def stop(self) -> None:
        if self.service.running:
            await tw(self.service.stopService())


async def start_service(redis, **changes) -> RunningService:
    """Start a service on an ephemeral port against ``redis`` (a fixture's
    server), subscribed, connected and done with start-up recovery before it
    is handed back, so that a test's own Redis commands are the only ones
    in flight."""
    from redmessenger import RedMessengerService, Settings
    from redmessenger.settings import AuthMode

    changes.setdefault("auth", AuthMode.OFF)
    changes.setdefault("port", "tcp:0:interface=127.0.0.1")
    settings = Settings(redis=redis.address, **changes)
    service = RedMessengerService(settings)
    service.startService()
    await tw(service.whenListening())
    await tw(service.subscriber.whenSubscribed())
    await tw(service.redis.whenConnected())
    await tw(service.whenRecovered())
    return RunningService(service, redis)


class Client:
    """A real WebSocket client, reading JSON frames."""

    def __init__(self, connection) -> None:
        self.connection = connection
        self.welcome: dict | None = None

    @classmethod
    async def connect(cls, url: str, **kwargs) -> Client:
        kwargs.setdefault("max_size", None)
        kwargs.setdefault("max_queue", None)  # read everything: close() must see the close frame
        return cls(await websockets.connect(url, **kwargs))

    async def send(self, data: str | bytes) -> None:
        await self.connection.send(data)

    async def send_json(self, doc: Any) -> None:
        await self.connection.send(json.dumps(doc))

    async def recv(self, timeout: float = RECV_TIMEOUT) -> dict:
        return json.loads(await asyncio.wait_for(self.connection.recv(), timeout))

    async def hello(self, uid: str, key: str | None = None, ack: bool = False) -> dict:
        doc: dict[str, Any] = {"id": uid}
        if key is not None:
            doc["key"] = key
        if ack:
            doc["ack"] = True
        await self.send_json(doc)
        welcome = await self.recv()
        assert welcome["type"] == "welcome", welcome
        return welcome

    async def messages(self, count: int, timeout: float = RECV_TIMEOUT) -> list[dict]:
        received = []
        for _ in range(count):
            frame = await self.recv(timeout)
            assert frame["type"] == "message", frame
            received.append(frame)
        return received

    async def ack(self, tag: int) -> None:
        await self.send_json({"type": "ack", "tag": tag})

    async def closed(self, timeout: float = RECV_TIMEOUT) -> tuple[list[dict], int | None, str]:
        """Read until the server closes: the frames before the close, its
        code and reason."""
        frames = []
        try:
            while True:
                frames.append(await self.recv(timeout))
        except websockets.ConnectionClosed as closed:
            rcvd = closed.rcvd
            return frames, (rcvd.code if rcvd else None), (rcvd.reason if rcvd else "")

    async def refused(self, timeout: float = RECV_TIMEOUT) -> tuple[dict, int]:
        """The error frame and close code of a refusal."""
        frames, code, reason = await self.closed(timeout)
        assert frames and frames[-1]["type"] == "error", (frames, code, reason)
        return frames[-1], code

    async def close(self) -> None:
        await self.connection.close()

    def abort(self) -> None:
        """Drop the TCP connection with no closing handshake."""
        self.connection.transport.abort()


async def get(url: str) -> tuple[int, dict[str, str], bytes]:
    """An HTTP GET from a coroutine (in a thread): status, headers (lower
    case names) and body, whatever the status."""
    def fetch():
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, _lower(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, _lower(error.headers), error.read()

    return await asyncio.get_running_loop().run_in_executor(None, fetch)


def _lower(headers) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def http_url(rm: RunningService, path: str = "/") -> str:
    """The URL of ``path`` on a running service's port (HTTP beside the
    WebSocket)."""
    return rm.url.replace("ws://", "http://", 1) + path.lstrip("/")


def metric(text: str, name: str) -> float:
    """A sample's value in a /metrics text (the first, whatever its labels)."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")
