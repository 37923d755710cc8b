"""HTTP beside the WebSocket on the same port: health, metrics, the client
script and the demo page, origin checks on the WebSocket handshake, and
which connections go to Autobahn and which to twisted.web."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket

import pytest
import websockets

from redmessenger import __version__
from redmessenger.admission import asks_for_websocket

from harness import (
    RECV_TIMEOUT,
    Client,
    aiotest,
    eventually,
    get,
    http_url,
    metric,
    start_service,
)
from network import HOST


@aiotest
async def test_health_says_ok_while_redis_is_connected_and_subscribed(messenger):
    rm = await messenger()
    await rm.user("user1")
    status, headers, body = await get(http_url(rm, "/health"))
    assert status == 200 and headers["content-type"] == "application/json"
    # "handshaking": this request's own connection, not a WebSocket.
    assert json.loads(body) == {"status": "ok", "node": rm.service.owner,
                                "redis": {"connected": True, "subscribed": True,
                                          "writable": True, "refusal": None},
                                "connections": 1, "handshaking": 1, "users_online": 1,
                                "version": __version__}


@aiotest
async def test_health_says_unavailable_while_redis_is_away(private_redis):
    rm = await start_service(private_redis)
    try:
        private_redis.stop()
        await eventually(lambda: not rm.service.redis.connected)
        status, _, body = await get(http_url(rm, "/health"))
        assert status == 503 and json.loads(body)["status"] == "unavailable"
        private_redis.start()
        await eventually(lambda: rm.service.subscriber.subscribed and rm.service.redis.connected)
        assert (await get(http_url(rm, "/health")))[0] == 200
    finally:
        await rm.stop()


@aiotest
async def test_metrics_count_what_happened(messenger):
    rm = await messenger()
    online = await rm.user("online")
    rm.publish("rm.users.offline", "stored")
    rm.publish("rm.users.online", "live")
    await online.messages(1)
    await eventually(lambda: rm.queue("offline"))
    drained = await rm.user("offline")
    await drained.messages(1)
    bad = await rm.connect()
    await bad.send("{oops")
    await bad.refused()

    status, headers, body = await get(http_url(rm, "/metrics"))
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert metric(text, "redmessenger_messages_received_total") == 2
    assert metric(text, "redmessenger_messages_delivered_live_total") == 1
    assert metric(text, "redmessenger_messages_stored_total") == 1
    assert metric(text, "redmessenger_messages_drained_total") == 1
    assert metric(text, "redmessenger_users_online") == 2
    assert 'redmessenger_sockets_closed_total{code="4000"} 1.0' in text
    assert metric(text, "redmessenger_delivery_latency_seconds_count") == 1
    assert metric(text, "redmessenger_redis_connected") == 1
    # Which node answers; a lone node stores for every partition.
    [labels] = re.findall(r"^redmessenger_node_info\{(.*)\} 1\.0$", text, re.MULTILINE)
    assert dict(re.findall(r'(\w+)="([^"]*)"', labels)) == {
        "node": rm.service.owner, "host": socket.gethostname(), "pid": str(os.getpid()),
        "version": __version__}
    assert metric(text, "redmessenger_storer_partitions_held") == 1
    assert metric(text, "redmessenger_storer_partitions") == 1


@aiotest
async def test_the_client_script_and_the_demo_page_are_served(messenger):
    rm = await messenger()
    status, headers, body = await get(http_url(rm, "/client.js"))
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert b"RedMessenger" in body
    status, headers, body = await get(http_url(rm, "/"))
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert (await get(http_url(rm, "/nothing-here")))[0] == 404


@aiotest
async def test_an_internal_port_takes_the_demo_page_health_and_metrics_off_the_public_one(
        messenger):
    """``--internal-port``: the public port keeps the WebSocket and
    /client.js; the internal one has everything (the demo page connects to
    its own origin, so WebSockets too)."""
    rm = await messenger(internal_port="tcp:0:interface=127.0.0.1")
    internal = f"http://{HOST}:{rm.service.internal_port.getHost().port}"
    for path in ("/", "/health", "/metrics"):
        assert (await get(http_url(rm, path)))[0] == 404, path
        assert (await get(internal + path))[0] == 200, path
    for base in (http_url(rm, "/"), internal + "/"):
        assert (await get(base + "client.js"))[0] == 200
        client = await Client.connect(base.replace("http://", "ws://", 1))
        assert (await client.hello("user1"))["type"] == "welcome"
        await client.close()
    _, _, body = await get(internal + "/health")
    assert json.loads(body)["status"] == "ok"


@aiotest
async def test_only_allowed_origins_may_open_a_websocket(messenger, logged):
    """A page from another origin gets 403, and the refusal is one line of
    the log (Autobahn's own two lines about it are not written)."""
    rm = await messenger(allowed_origins=("https://app.example.com", "http://*.example.org"))
    for origin in ("https://app.example.com", "http://dev.example.org"):
        client = await rm.connect(origin=origin)
        assert (await client.hello("user1"))["type"] == "welcome"
        await client.close()
    for origin in ("https://evil.example.net", "null"):
        try:
            await rm.connect(origin=origin)
        except websockets.InvalidStatus as refused:
            assert refused.response.status_code == 403
        else:
            raise AssertionError(f"{origin} was let in")
    about = [line for line in logged if "evil.example.net" in line]
    assert len(about) == 1 and "is not allowed" in about[0], about
    assert not [line for line in logged if "opening handshake" in line
                or "dropping connection" in line], logged


UPGRADE = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def masked_text(payload: bytes) -> bytes:
    """A client's text frame (short payloads only)."""
    mask = b"\x01\x02\x03\x04"
    return (bytes([0x81, 0x80 | len(payload)]) + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


async def received(reader) -> dict:
    """The server's next frame: a text frame of JSON."""
    first, length = await asyncio.wait_for(reader.readexactly(2), RECV_TIMEOUT)
    assert first == 0x81 and length < 127
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    return json.loads(await asyncio.wait_for(reader.readexactly(length), RECV_TIMEOUT))


async def welcomed(reader, writer, uid: str) -> dict:
    """After a 101: say hello as ``uid``, return the welcome."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RECV_TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455's sample key's accept
    writer.write(masked_text(json.dumps({"id": uid}).encode()))
    return await received(reader)


@aiotest
async def test_an_upgrade_after_other_requests_on_its_connection_still_opens_a_websocket(
        messenger):
    """The first request of a connection says where it goes; an upgrade
    that comes later on a keep-alive connection (a proxy's) goes through
    twisted.web to the same WebSocket."""
    rm = await messenger()
    reader, writer = await asyncio.open_connection("127.0.0.1", rm.service.port.getHost().port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RECV_TIMEOUT)
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    assert json.loads(await reader.readexactly(length))["status"] == "ok"
    writer.write(UPGRADE)
    assert (await welcomed(reader, writer, "user1"))["type"] == "welcome"
    rm.publish("rm.users.user1", "through twisted.web")
    assert (await received(reader))["payload"] == "through twisted.web"
    writer.close()


@aiotest
async def test_a_trickled_upgrade_request_opens_a_websocket(messenger):
    rm = await messenger()
    reader, writer = await asyncio.open_connection("127.0.0.1", rm.service.port.getHost().port)
    for byte in UPGRADE:
        writer.write(bytes([byte]))
        await writer.drain()
    assert (await welcomed(reader, writer, "user1"))["type"] == "welcome"
    writer.close()


@pytest.mark.parametrize(
    ("head", "websocket"),
    [
        (UPGRADE, True),
        (UPGRADE.replace(b"GET / ", b"GET /?a=1 "), True),
        (UPGRADE.replace(b"Upgrade: websocket", b"upgrade:WebSocket "), True),
        (UPGRADE[:-2], False),  # not whole yet
        (UPGRADE.replace(b"GET / ", b"GET /health "), False),
        (UPGRADE.replace(b"GET ", b"POST "), False),
        (UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0"), False),
        (UPGRADE.replace(b"GET / ", b"GET  / "), False),
        (UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: h2c"), False),
        (UPGRADE.replace(b"Connection:", b" Connection:"), False),  # folded
        (UPGRADE.replace(b"\r\n", b"\n"), False),
    ],
)
def test_what_goes_straight_to_autobahn(head: bytes, websocket: bool) -> None:
    """Only a plain upgrade of ``/``; twisted.web gets the rest (and upgrades
    or refuses it as it always did)."""
    assert asks_for_websocket(head) is websocket
