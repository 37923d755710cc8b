"""Server-Sent Events (``GET /events``, ``POST /events/ack``) against a real
service and Redis, read by a raw HTTP client (tests/sse.py) and by curl:
every message published is counted out exactly once, through resumes,
full windows, slow readers and refusals."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import pytest

from redmessenger import AuthMode

from harness import RECV_TIMEOUT, aiotest, eventually, get, http_url, metric
from sse import EventStreamClient


def port_of(rm) -> int:
    return rm.service.port.getHost().port


async def stream(rm, uid: str, headers: dict | None = None, **kwargs) -> EventStreamClient:
    client = await EventStreamClient.open(port_of(rm), f"/events?id={uid}", headers, **kwargs)
    rm.clients.append(client)
    return client


def payloads(events) -> list[str]:
    return [event.json()["payload"] for event in events]


def publish(rm, uid: str, payloads) -> None:
    for payload in payloads:
        rm.publish(f"rm.users.{uid}", payload)


async def stored(rm, uid: str, count: int) -> list[dict]:
    """Wait until ``uid``'s queue holds ``count`` messages."""
    await eventually(lambda: len(rm.queue(uid)) == count, what=f"{count} stored for {uid}")
    return rm.queue(uid)


@aiotest
async def test_a_stream_is_welcomed_then_gets_stored_and_live_messages_with_their_ids(
        messenger) -> None:
    rm = await messenger()
    publish(rm, "u", ["one", "two", "three"])
    await stored(rm, "u", 3)
    client = await stream(rm, "u")
    assert client.status == 200
    assert client.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert client.chunked and client.headers["cache-control"] == "no-store"
    welcome = await client.event()
    assert welcome.type == "welcome"
    assert welcome.json() == {"type": "welcome", "id": "u", "channel": "rm.users.u",
                              "queued": 3, "ack": True}
    assert client.retry == 1000
    first = await client.events(3)
    publish(rm, "u", ["four", "five"])
    then = await client.events(2)
    assert payloads(first + then) == ["one", "two", "three", "four", "five"]
    assert all(e.type == "message" and e.id == e.json()["id"] for e in first + then)
    assert [e.json()["queued"] for e in first + then] == [True] * 3 + [False] * 2
    text = (await get(http_url(rm, "/metrics")))[2].decode()
    assert metric(text, "redmessenger_event_streams") == 1
    assert metric(text, "redmessenger_connections") == 1
    client.abort()
    # Nothing was acknowledged: all five go back, in order.
    assert [m["payload"] for m in await stored(rm, "u", 5)] == payloads(first + then)


@aiotest
async def test_an_http_1_0_stream_is_not_chunked_and_ends_with_its_connection(
        messenger) -> None:
    rm = await messenger(ping_interval=0.2)
    client = await stream(rm, "u", version="HTTP/1.0")
    assert client.status == 200 and not client.chunked
    assert (await client.event()).type == "welcome"
    publish(rm, "u", ["a", "b"])
    assert payloads(await client.events(2)) == ["a", "b"]
    await client.pings(2)
    assert client.comments == ["ping", "ping"]
    await rm.stop()
    rest = await client.ended()  # the stop ends it with an error event
    assert [e.type for e in rest] == ["error"]
    assert rest[0].json()["code"] == "shutting_down"
    assert [m["payload"] for m in rm.queue("u")] == ["a", "b"]


@aiotest
async def test_last_event_id_acknowledges_through_it_and_what_came_after_comes_first(
        messenger) -> None:
    """A stream cut off (no FIN: the network went) and its reconnect with
    Last-Event-ID: nothing through that id comes again, everything after
    it comes first and in order, then what was published meanwhile."""
    rm = await messenger()
    publish(rm, "u", [f"m{i}" for i in range(6)])
    await stored(rm, "u", 6)
    first = await stream(rm, "u")
    await first.event()
    got = await first.events(6)
    publish(rm, "u", ["m6"])
    got += await first.events(1)
    # The client had up to m3 when its network went: the reconnect comes
    # before the server has seen the old stream go.
    again = await stream(rm, "u", {"Last-Event-ID": got[3].id})
    welcome = await again.event()
    publish(rm, "u", ["m7"])
    rest = await again.events(4)
    assert payloads(rest) == ["m4", "m5", "m6", "m7"]
    assert welcome.json()["queued"] == 3
    # The old stream was ended: the server counts it as replaced.
    assert await first.ended() == []
    # And the ids of what came again are the same.
    assert [e.id for e in rest[:3]] == [e.id for e in got[4:]]
    again.abort()
    assert [m["payload"] for m in await stored(rm, "u", 4)] == ["m4", "m5", "m6", "m7"]


@aiotest
async def test_a_resume_after_the_old_stream_is_gone_drops_what_it_acknowledges_from_the_queue(
        messenger) -> None:
    rm = await messenger()
    publish(rm, "u", [f"m{i}" for i in range(5)])
    client = await stream(rm, "u")
    await client.event()
    got = await client.events(5)
    client.abort()
    await stored(rm, "u", 5)  # back in the queue, unacknowledged
    publish(rm, "u", ["m5"])
    await stored(rm, "u", 6)
    again = await stream(rm, "u", {"Last-Event-ID": got[1].id})
    assert (await again.event()).json()["queued"] == 4
    assert payloads(await again.events(4)) == ["m2", "m3", "m4", "m5"]
    again.abort()
    # An id the queue does not hold (already acknowledged, or unknown):
    # everything unacknowledged comes again.
    await stored(rm, "u", 4)
    for last in (got[1].id, "no-such-id"):
        client = await stream(rm, "u", {"Last-Event-ID": last})
        assert (await client.event()).json()["queued"] == 4
        assert payloads(await client.events(4)) == ["m2", "m3", "m4", "m5"]
        client.abort()
        await stored(rm, "u", 4)


@aiotest
async def test_post_ack_acknowledges_without_reconnecting(messenger) -> None:
    rm = await messenger()
    client = await stream(rm, "u")
    await client.event()
    publish(rm, "u", ["a", "b", "c", "d"])
    got = await client.events(4)
    ack = await EventStreamClient.open(
        port_of(rm), "/events/ack", method="POST",
        body=json.dumps({"id": "u", "last": got[1].id}).encode(),
        headers={"Content-Type": "application/json"})
    assert ack.status == 200
    assert json.loads(await ack.body()) == {"type": "acked", "settled": 2}
    # An id this node's streams did not send unacknowledged settles nothing.
    ack = await EventStreamClient.open(
        port_of(rm), "/events/ack", method="POST",
        body=json.dumps({"id": "u", "last": got[1].id}).encode())
    assert json.loads(await ack.body()) == {"type": "acked", "settled": 0}
    client.abort()
    assert [m["payload"] for m in await stored(rm, "u", 2)] == ["c", "d"]


@aiotest
async def test_a_full_ack_window_ends_the_stream_and_each_reconnect_acknowledges_it(
        messenger) -> None:
    """A plain EventSource never acks: at --ack-window unacknowledged
    messages its stream ends, and its reconnect (with Last-Event-ID) is the
    ack. Twelve messages through a window of five: three streams, each
    message once."""
    rm = await messenger(ack_window=5)
    sent = [f"m{i:02d}" for i in range(12)]
    publish(rm, "u", sent)
    await stored(rm, "u", 12)
    received, last = [], None
    for expected in (12, 7):
        client = await stream(rm, "u", {"Last-Event-ID": last} if last else None)
        assert (await client.event()).json()["queued"] == expected
        events = await client.ended()
        assert len(events) == 5
        # And so does its connection: it has no handshake deadline any more.
        assert await asyncio.wait_for(client.reader.read(), RECV_TIMEOUT) == b""
        received += events
        last = events[-1].id
    client = await stream(rm, "u", {"Last-Event-ID": last})
    assert (await client.event()).json()["queued"] == 2
    received += await client.events(2)
    assert payloads(received) == sent
    publish(rm, "u", ["live"])
    assert payloads(await client.events(1)) == ["live"]
    client.abort()
    assert [m["payload"] for m in await stored(rm, "u", 3)] == ["m10", "m11", "live"]


@aiotest
async def test_a_stream_is_checked_as_a_hello_is_and_each_refusal_has_its_status(
        messenger, logged) -> None:
    """400 for a bad id, 401 for a wrong or missing key (as the error JSON
    a WebSocket would get), 403 for an origin not allowed, 429 past the
    hello rate; each logged once. The key may come as a Bearer token or
    in the query; the access log never shows it."""
    rm = await messenger(auth=AuthMode.REQUIRED, hello_rate=4,
                         allowed_origins=("https://app.example.com",))
    rm.redis.command("SET", "rm:users:alice:key", "s3cret")
    cases = [
        ("/events", {}, 400, "bad_request"),
        ("/events?id=a%20b", {}, 400, "bad_request"),
        ("/events?id=alice", {}, 401, "unauthorized"),
        ("/events?id=alice&key=wrong", {}, 401, "unauthorized"),
        ("/events?id=alice", {"Authorization": "Basic czNjcmV0"}, 400, "bad_request"),
        ("/events?id=alice&key=s3cret", {"Origin": "https://elsewhere.example.com"}, 403,
         "forbidden_origin"),
    ]
    for path, headers, status, code in cases:
        client = await EventStreamClient.open(port_of(rm), path, headers)
        assert client.status == status, path
        assert json.loads(await client.body())["code"] == code
        client.abort()
    refusals = [line for line in logged if line.startswith("Refusing the event stream")]
    assert len(refusals) == len(cases)
    by_bearer = await stream(rm, "alice", {"Authorization": "Bearer s3cret",
                                            "Origin": "https://app.example.com"})
    assert by_bearer.status == 200
    assert by_bearer.headers["access-control-allow-origin"] == "https://app.example.com"
    by_query = await EventStreamClient.open(port_of(rm), "/events?id=alice&key=s3cret")
    assert (await by_bearer.event()).type == (await by_query.event()).type == "welcome"
    # Four hellos of this address in a burst were refused above (those
    # that got as far as the key) or let in: the next is one too many.
    limited = await EventStreamClient.open(port_of(rm), "/events?id=alice&key=s3cret")
    assert limited.status == 429 and limited.headers["retry-after"] == "5"
    assert json.loads(await limited.body())["code"] == "hello_rate"
    rm.publish("rm.users.alice", "hi")
    assert payloads(await by_bearer.events(1)) == payloads(await by_query.events(1)) == ["hi"]
    assert not [line for line in logged if "s3cret" in line]
    assert [line for line in logged if "key=-" in line]
    by_query.abort()


@aiotest
async def test_a_stream_while_redis_is_away_gets_503_and_retry_after(private_redis,
                                                                      logged) -> None:
    from harness import start_service

    rm = await start_service(private_redis)
    try:
        private_redis.stop()
        await eventually(lambda: not rm.service.redis.connected)
        client = await stream(rm, "u")
        assert client.status == 503 and client.headers["retry-after"] == "1"
        assert json.loads(await client.body())["code"] == "redis_unavailable"
        assert len([line for line in logged if "Redis is away" in line]) == 1
        private_redis.start()
        await eventually(lambda: rm.service.redis.connected)
        await tw_subscribed(rm)
        client = await stream(rm, "u")
        assert (await client.event()).type == "welcome"
        rm.publish("rm.users.u", "back")
        assert payloads(await client.events(1)) == ["back"]
        client.abort()
    finally:
        await rm.stop()


async def tw_subscribed(rm) -> None:
    from harness import tw

    await tw(rm.service.subscriber.whenSubscribed())


@aiotest
async def test_streams_and_websockets_share_max_sockets_per_user(messenger) -> None:
    rm = await messenger(max_sockets_per_user=2)
    websocket = await rm.user("u")
    first = await stream(rm, "u")
    assert (await first.event()).type == "welcome"
    second = await stream(rm, "u")  # the third socket: the oldest, the WebSocket, goes
    assert (await second.event()).type == "welcome"
    _, code, _ = await websocket.closed()
    assert code == 4009
    third = await stream(rm, "u")
    assert (await third.event()).type == "welcome"
    ended = await first.ended()
    assert [(e.type, e.json()["code"]) for e in ended] == [("error", "too_many_sockets")]
    rm.publish("rm.users.u", "to both")
    assert payloads(await second.events(1)) == payloads(await third.events(1)) == ["to both"]


@aiotest
async def test_a_stream_too_slow_to_read_is_ended_and_loses_nothing(messenger, logged) -> None:
    """A reader that stops reading: once what it was sent has not left for
    --ping-timeout, its stream ends (4010 counted, logged once), and every
    message is back in the queue, in order, whatever had reached its
    socket (nothing was acknowledged)."""
    rm = await messenger(ping_interval=5, ping_timeout=1)
    client = await stream(rm, "u")
    assert (await client.event()).type == "welcome"
    client.writer.transport.pause_reading()
    big = "x" * 20_000
    sent = [f"{i:04d}{big}" for i in range(400)]
    publish(rm, "u", sent)
    await eventually(lambda: rm.dispatcher.stats.closed_by_code[4010] == 1, what="4010")
    client.writer.transport.resume_reading()
    received = await client.ended()
    assert received[-1].type == "error" and received[-1].json()["code"] == "too_slow"
    assert payloads(received[:-1]) == sent[:len(received) - 1]
    queue = await stored(rm, "u", len(sent))
    assert [m["payload"] for m in queue] == sent
    assert len([line for line in logged if "too slow" in line]) == 1
    assert len([line for line in logged if "took none of its stream" in line]) == 1


@aiotest
async def test_a_stream_past_max_socket_buffer_is_ended_and_loses_nothing(messenger) -> None:
    """Live messages for a stream that does not keep up go to Redis, and
    count against --max-socket-buffer: past it the stream ends (4010)."""
    rm = await messenger(max_socket_buffer=256 * 1024, ping_interval=0)
    client = await stream(rm, "u")
    assert (await client.event()).type == "welcome"
    client.writer.transport.pause_reading()
    big = "x" * 20_000
    sent = []
    while not rm.dispatcher.stats.closed_by_code[4010]:
        sent.append(f"{len(sent):04d}{big}")
        rm.publish("rm.users.u", sent[-1])
        await asyncio.sleep(0.005)
        assert len(sent) < 2000, "never too slow"
    client.writer.transport.resume_reading()
    received = await client.ended()
    assert received[-1].json()["code"] == "too_slow"
    assert payloads(received[:-1]) == sent[:len(received) - 1]
    assert [m["payload"] for m in await stored(rm, "u", len(sent))] == sent


@aiotest
async def test_curl_reads_a_stream(messenger) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    rm = await messenger(auth=AuthMode.REQUIRED)
    rm.redis.command("SET", "rm:users:carol:key", "k3y")
    rm.publish("rm.users.carol", "stored")
    await stored(rm, "carol", 1)
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sN", "-H", "Authorization: Bearer k3y",
        f"http://127.0.0.1:{port_of(rm)}/events?id=carol", stdout=subprocess.PIPE)
    try:
        lines = []
        while len([line for line in lines if line.startswith(b"data:")]) < 2:
            line = await asyncio.wait_for(curl.stdout.readline(), RECV_TIMEOUT)
            lines.append(line)
            if line.startswith(b"event: message"):
                rm.publish("rm.users.carol", "live")
        data = [json.loads(line[5:]) for line in lines if line.startswith(b"data:")]
        assert [d["type"] for d in data] == ["welcome", "message"]
        assert data[1]["payload"] == "stored"
        line = b""
        while not line.startswith(b"data:"):
            line = await asyncio.wait_for(curl.stdout.readline(), RECV_TIMEOUT)
        assert json.loads(line[5:])["payload"] == "live"
    finally:
        curl.kill()
        await curl.wait()
    assert [m["payload"] for m in await stored(rm, "carol", 2)] == ["stored", "live"]


@aiotest
async def test_acks_posted_in_time_keep_a_full_window_stream_open(messenger) -> None:
    """A client that posts its acks is not cut off at a full window: the
    stream ends only after a second with the window full and no ack."""
    rm = await messenger(ack_window=5)
    client = await stream(rm, "u")
    await client.event()
    sent = [f"m{i}" for i in range(15)]
    received = []
    for batch in (sent[:5], sent[5:10], sent[10:]):
        publish(rm, "u", batch)
        received += await client.events(5)
        ack = await EventStreamClient.open(
            port_of(rm), "/events/ack", method="POST",
            body=json.dumps({"id": "u", "last": received[-1].id}).encode())
        assert json.loads(await ack.body()) == {"type": "acked", "settled": 5}
    assert payloads(received) == sent
    assert rm.service.streams.window == 5 and len(rm.service.streams) == 1
    client.abort()
    await eventually(lambda: rm.dispatcher.users == 0)
    assert rm.queue("u") == []


@aiotest
async def test_a_stream_takes_a_jwt_as_a_hello_does(messenger) -> None:
    import time

    import jwt

    secret = "a-secret-of-at-least-thirty-two-bytes!"
    rm = await messenger(auth=AuthMode.JWT, jwt_secret=secret)

    def token(sub: str, expires_in: float = 60) -> str:
        return jwt.encode({"sub": sub, "exp": int(time.time() + expires_in)}, secret,
                          algorithm="HS256")

    for key, status in ((token("dave"), 200), (token("eve"), 401),
                        (token("dave", expires_in=-60), 401)):
        client = await stream(rm, "dave", {"Authorization": f"Bearer {key}"})
        assert client.status == status
        if status == 200:
            assert (await client.event()).type == "welcome"
        else:
            assert json.loads(await client.body())["code"] == "unauthorized"
        client.abort()
    client = await EventStreamClient.open(port_of(rm), f"/events?id=dave&key={token('dave')}")
    assert (await client.event()).type == "welcome"
    client.abort()


@aiotest
async def test_a_refused_stream_keeps_the_handshake_deadline_and_a_stream_loses_it(
        messenger) -> None:
    """On RedMessenger's own port a connection has --handshake-timeout to
    become a WebSocket or a stream: one that only got a refusal is closed
    then; a stream that began outlives it."""
    rm = await messenger(auth=AuthMode.REQUIRED, handshake_timeout=1)
    rm.redis.command("SET", "rm:users:alice:key", "s3cret")
    good = await stream(rm, "alice", {"Authorization": "Bearer s3cret"})
    assert (await good.event()).type == "welcome"
    refused = await stream(rm, "alice", {"Authorization": "Bearer wrong"})
    assert refused.status == 401 and json.loads(await refused.body())["code"] == "unauthorized"
    try:  # the deadline aborts it
        assert await asyncio.wait_for(refused.reader.read(), RECV_TIMEOUT) == b""
    except ConnectionResetError:
        pass
    assert rm.service.handshaking == 0
    rm.publish("rm.users.alice", "still here")
    assert payloads(await good.events(1)) == ["still here"]


@aiotest
async def test_preflights_head_and_bad_acks_get_their_answers(messenger, logged) -> None:
    rm = await messenger(allowed_origins=("https://app.example.com",))
    port = port_of(rm)
    for path in ("/events", "/events/ack"):
        allowed = await EventStreamClient.open(port, path, {"Origin": "https://app.example.com"},
                                               method="OPTIONS")
        assert allowed.status == 204
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "last-event-id" in allowed.headers["access-control-allow-headers"]
        refused = await EventStreamClient.open(port, path, {"Origin": "https://evil.example"},
                                               method="OPTIONS")
        assert refused.status == 403
        assert json.loads(await refused.body())["code"] == "forbidden_origin"
    head = await EventStreamClient.open(port, "/events?id=u", method="HEAD")
    assert head.status == 405 and rm.dispatcher.users == 0
    for body, why in ((b"x" * 5000, "at most"), (b"{oops", "not JSON"), (b"[1]", "must be"),
                      (b'{"id": "u"}', '"last"'), (b'{"id": "a b", "last": "x"}', '"id"')):
        answer = await EventStreamClient.open(port, "/events/ack", method="POST", body=body)
        assert answer.status == 400
        error = json.loads(await answer.body())
        assert error["code"] == "bad_request" and why in error["reason"], error
    refusals = [line for line in logged if line.startswith("Refusing the event stream")]
    assert len(refusals) == 2 + 5


@aiotest
async def test_an_id_a_line_break_would_split_is_sent_without_its_id_line(messenger) -> None:
    """An envelope another program wrote may have any id: one with a line
    break would end the event early, so the event goes without ``id:`` (the
    browser resumes from the message before: a duplicate, not a loss)."""
    rm = await messenger()
    rm.redis.command("RPUSH", "rm:users:u:messages",
                     '{"id":"two\\nlines","source":"rm.users.u","timestamp":1,"payload":"odd"}')
    publish(rm, "u", ["plain"])
    await stored(rm, "u", 2)
    client = await stream(rm, "u")
    await client.event()
    odd, plain = await client.events(2)
    assert odd.id is None and odd.json()["id"] == "two\nlines" and odd.json()["payload"] == "odd"
    assert plain.id == plain.json()["id"]
    client.abort()
    assert [m["payload"] for m in await stored(rm, "u", 2)] == ["odd", "plain"]


@aiotest
async def test_a_resume_redis_refuses_is_logged_once_and_the_stream_goes_on(
        messenger, logged) -> None:
    """A queue key that another program made a string: the resume's script
    gets WRONGTYPE. It is logged once, the stream still opens, and once the
    key is a queue again the user's messages come."""
    rm = await messenger()
    rm.redis.command("SET", "rm:users:u:messages", "not a list")
    client = await stream(rm, "u", {"Last-Event-ID": "some-id"})
    assert client.status == 200 and (await client.event()).type == "welcome"
    dropped = [line for line in logged if "Could not drop what u acknowledged" in line]
    assert len(dropped) == 1 and "WRONGTYPE" in dropped[0], logged
    rm.redis.command("DEL", "rm:users:u:messages")
    publish(rm, "u", ["after"])
    assert payloads(await client.events(1)) == ["after"]
    client.abort()
    assert [m["payload"] for m in await stored(rm, "u", 1)] == ["after"]
