"""HTTP beside the WebSocket on the same port: health, metrics, the client
script and the demo page, and origin checks on the WebSocket handshake."""

from __future__ import annotations

import json

import websockets

from harness import aiotest, eventually, get, http_url, metric, start_service


@aiotest
async def test_health_says_ok_while_redis_is_connected_and_subscribed(messenger):
    rm = await messenger()
    await rm.user("user1")
    status, headers, body = await get(http_url(rm, "/health"))
    assert status == 200 and headers["content-type"] == "application/json"
    from redmessenger import __version__

    # "handshaking": this request's own connection, not a WebSocket.
    assert json.loads(body) == {"status": "ok",
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
async def test_only_allowed_origins_may_open_a_websocket(messenger):
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
