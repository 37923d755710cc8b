"""JWT auth, limits against abuse, and WebSocket over TLS (wss://)."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time

import jwt
import pytest
import websockets

from redmessenger.settings import AuthMode

from harness import RECV_TIMEOUT, Client, aiotest, eventually, metric, start_service, tw

SECRET = "correct horse battery staple, and more"


def token(sub: str, *, expires_in: float = 60, secret: str = SECRET, **claims) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + expires_in), **claims}, secret,
                      algorithm="HS256")


@aiotest
async def test_jwt_auth_admits_the_tokens_subject_only(messenger):
    rm = await messenger(auth=AuthMode.JWT, jwt_secret=SECRET)
    user1 = await rm.user("user1", key=token("user1"))
    rm.publish("rm.users.user1", "hi")
    assert (await user1.messages(1))[0]["payload"] == "hi"

    refusals = {
        "wrong subject": ("user2", token("user1")),
        "expired": ("user1", token("user1", expires_in=-10)),
        "wrong secret": ("user1", token("user1", secret="a guess long enough, still wrong")),
        "no exp": ("user1", jwt.encode({"sub": "user1"}, SECRET, algorithm="HS256")),
        "not a JWT": ("user1", "s3cret"),
        "no key": ("user1", None),
    }
    for case, (uid, key) in refusals.items():
        client = await rm.connect()
        await client.send_json({"id": uid} if key is None else {"id": uid, "key": key})
        error, code = await client.refused()
        assert (code, error["code"]) == (4001, "unauthorized"), case
    assert rm.dispatcher.stats.closed_by_code[4001] == len(refusals)


async def jwt_verdict(rm, key: str, uid: str = "user1") -> dict:
    """The frame a hello with this JWT gets: the welcome or the refusal."""
    client = await rm.connect()
    await client.send_json({"id": uid, "key": key})
    frame = await client.recv()
    if frame["type"] == "welcome":
        await client.close()
        return frame
    _, code, _ = await client.closed()
    return {**frame, "close": code}


@aiotest
async def test_a_token_with_an_aud_is_accepted_without_jwt_audience(messenger):
    """Before: PyJWT refused every token with an aud when given no audience."""
    rm = await messenger(auth=AuthMode.JWT, jwt_secret=SECRET)
    for aud in ("someone-else", ["a", "b"]):
        assert (await jwt_verdict(rm, token("user1", aud=aud)))["type"] == "welcome"


@aiotest
async def test_jwt_audience_and_issuer_bind_tokens_to_this_service(messenger):
    rm = await messenger(auth=AuthMode.JWT, jwt_secret=SECRET, jwt_audience="messenger",
                         jwt_issuer="https://app.example")
    good = {"aud": "messenger", "iss": "https://app.example"}
    assert (await jwt_verdict(rm, token("user1", **good)))["type"] == "welcome"
    assert (await jwt_verdict(rm, token("user1", **{**good, "aud": ["x", "messenger"]})))[
        "type"] == "welcome"
    refusals = {
        "other aud": ({**good, "aud": "another-service"}, "Audience doesn't match"),
        "no aud": ({"iss": good["iss"]}, 'missing the "aud" claim'),
        "other iss": ({**good, "iss": "https://evil.example"}, "Invalid issuer"),
        "no iss": ({"aud": good["aud"]}, 'missing the "iss" claim'),
    }
    for case, (claims, reason) in refusals.items():
        verdict = await jwt_verdict(rm, token("user1", **claims))
        assert (verdict["close"], verdict["code"]) == (4001, "unauthorized"), case
        assert reason in verdict["reason"], (case, verdict)


@aiotest
async def test_jwt_max_age_refuses_long_lived_tokens(messenger):
    rm = await messenger(auth=AuthMode.JWT, jwt_secret=SECRET, jwt_max_age=3600)
    now = int(time.time())
    assert (await jwt_verdict(rm, token("user1", expires_in=3000, iat=now)))["type"] == \
        "welcome"
    assert (await jwt_verdict(rm, token("user1", exp=now + 3590, iat=now - 10)))[
        "type"] == "welcome"  # exactly the most
    refusals = {
        "lives too long": (token("user1", expires_in=7200, iat=now),
                           "valid for longer than 3600 s"),
        "issued long before": (token("user1", expires_in=60, iat=now - 86400),
                               "valid for longer than 3600 s"),
        "no iat": (token("user1", expires_in=60), 'missing the "iat" claim'),
    }
    for case, (key, reason) in refusals.items():
        verdict = await jwt_verdict(rm, key)
        assert (verdict["close"], verdict["code"]) == (4001, "unauthorized"), case
        assert reason in verdict["reason"], (case, verdict)


@aiotest
async def test_unknown_ids_and_wrong_keys_are_refused_alike(messenger, logged):
    """Before: "unknown user: no key is stored for this id" told a client
    which ids exist. The client sees one answer; the log says which it was."""
    rm = await messenger(auth=AuthMode.REQUIRED)
    rm.redis.command("SET", "rm:users:alice:key", "s3cret")
    answers = {}
    for case, hello in {"wrong key": {"id": "alice", "key": "guess"},
                        "unknown id": {"id": "nobody", "key": "guess"},
                        "known id, no key": {"id": "alice"},
                        "unknown id, no key": {"id": "nobody"}}.items():
        client = await rm.connect()
        await client.send_json(hello)
        answers[case] = await client.closed()
    assert answers["wrong key"] == answers["unknown id"] == (
        [{"type": "error", "code": "unauthorized", "reason": "wrong key"}], 4001, "wrong key")
    assert answers["known id, no key"] == answers["unknown id, no key"] == (
        [{"type": "error", "code": "unauthorized", "reason": "this user needs a key"}], 4001,
        "this user needs a key")
    refusals = [line for line in logged if "Refusing" in line]
    assert len(refusals) == 4, refusals
    assert "(alice): unauthorized: wrong key (the key does not match)" in refusals[0]
    assert "(nobody): unauthorized: wrong key (no key is stored for this id)" in refusals[1]
    assert "(alice): unauthorized: this user needs a key (the hello has no key)" in refusals[2]
    assert ("(nobody): unauthorized: this user needs a key (no key is stored for this id)"
            in refusals[3])


@aiotest
async def test_an_unknown_id_costs_the_same_key_comparison(messenger, monkeypatch):
    """Same timing: an unknown id is compared (with a stand-in) exactly as a
    wrong key is, so a refusal takes as long either way."""
    import hmac

    compared = []
    real = hmac.compare_digest

    def compare_digest(a, b):
        if b == b"guess":
            compared.append(len(a))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", compare_digest)
    rm = await messenger(auth=AuthMode.REQUIRED)
    rm.redis.command("SET", "rm:users:alice:key", "s3cret")
    for uid in ("alice", "nobody"):
        client = await rm.connect()
        await client.send_json({"id": uid, "key": "guess"})
        await client.closed()
    assert len(compared) == 2  # alice's key, then the stand-in


async def refused_at_accept(connecting) -> str:
    """The reason in the HTTP 503 a connection past a limit gets at once."""
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connecting
    assert refused.value.response.status_code == 503
    return refused.value.response.body.decode()


@aiotest
async def test_connection_limits_per_address_and_in_total(messenger):
    rm = await messenger(max_connections_per_address=2)
    first, second = await rm.connect(), await rm.connect()
    reason = await refused_at_accept(rm.connect())
    assert reason == "127.0.0.1 has its maximum of 2 connections\n"
    await first.close()
    again = await rm.connect()  # a place freed up
    assert (await again.hello("user1"))["type"] == "welcome"
    await second.close()

    rm2 = await messenger(max_connections=1)
    only = await rm2.user("a")
    assert "maximum of 1 connections" in await refused_at_accept(rm2.connect())
    rm2.publish("rm.users.a", "still served")
    assert (await only.messages(1))[0]["payload"] == "still served"


async def open_from(rm, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TCP connection to the service from a loopback address of our
    choosing (each counts for --max-connections-per-address on its own)."""
    port = rm.service.port.getHost().port
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed (a reset counts as a close)."""
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


async def http_get(reader, writer, path: str) -> tuple[int, bytes]:
    """One request on a connection kept alive after it, and its answer."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RECV_TIMEOUT)
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    return int(head.split()[1]), await reader.readexactly(length)


async def http_get_once(rm, source: str, path: str) -> tuple[int, bytes]:
    """One HTTP/1.0 request from ``source``: the answer ends with the connection."""
    reader, writer = await open_from(rm, source)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    head, _, body = (await asyncio.wait_for(read_to_end(reader), RECV_TIMEOUT)).partition(
        b"\r\n\r\n")
    writer.close()
    return int(head.split()[1]), body


@aiotest
async def test_connections_count_from_accept_and_slow_handshakes_are_closed(messenger, logged):
    """50 connections that trickle an HTTP request (slowloris) hold the 3
    places of their address, not 50, and only for --handshake-timeout; the
    rest are refused at once; a WebSocket that upgraded in time stays."""
    deadline = 3.0  # room for the checks below on a loaded machine (they take 0.05 s)
    rm = await messenger(max_connections=5, max_connections_per_address=3,
                         handshake_timeout=deadline)
    opened = time.monotonic()
    slow = [await open_from(rm, "127.0.0.1") for _ in range(50)]
    for _, writer in slow:
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    answers = [asyncio.ensure_future(read_to_end(reader)) for reader, _ in slow]
    await eventually(lambda: sum(a.done() for a in answers) == 47, what="47 refusals")
    held = [(writer, answer) for (_, writer), answer in zip(slow, answers, strict=True)
            if not answer.done()]
    assert len(held) == 3
    for answer in answers:
        if answer.done():
            assert answer.result().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            assert answer.result().endswith(b"\r\n\r\n127.0.0.1 has its maximum of 3 connections\n")

    # Another address has places left: its /health counts the slow ones (and
    # itself), none of them a WebSocket. It stays open, idle.
    idle = await open_from(rm, "127.0.0.2")
    status, body = await http_get(*idle, "/health")
    assert status == 200
    assert (json.loads(body)["connections"], json.loads(body)["handshaking"]) == (0, 4)
    user = await rm.user("user1", local_addr=("127.0.0.2", 0))  # the 5th and last place
    assert "the server has its maximum of 5 connections" in await refused_at_accept(
        rm.connect(local_addr=("127.0.0.3", 0)))
    assert time.monotonic() - opened < deadline, "the checks above took the whole deadline"

    # Trickling does not push the deadline back.
    while held:
        for writer, _ in held:
            writer.write(b"X")
        await asyncio.sleep(0.1)
        for _, answer in held:
            if answer.done():
                assert answer.result() == b""  # closed without an answer
                assert time.monotonic() - opened > deadline * 0.9
        held = [(writer, answer) for writer, answer in held if not answer.done()]
        assert time.monotonic() - opened < deadline + RECV_TIMEOUT
    assert await asyncio.wait_for(read_to_end(idle[0]), RECV_TIMEOUT) == b""

    # Counted: the 3 slow ones, not the idle keep-alive connection.
    status, text = await http_get_once(rm, "127.0.0.3", "/metrics")
    assert status == 200
    assert metric(text.decode(), "redmessenger_handshake_timeouts_total") == 3
    assert metric(text.decode(), "redmessenger_connections_refused_total") == 48
    assert metric(text.decode(), "redmessenger_connections_handshaking") == 1
    assert metric(text.decode(), "redmessenger_connections") == 1
    rm.publish("rm.users.user1", "the WebSocket was not closed")
    assert (await user.messages(1))[0]["payload"] == "the WebSocket was not closed"
    assert (await (await rm.connect()).hello("user2"))["type"] == "welcome"
    for _, writer in [*slow, idle]:
        writer.close()
    assert len([line for line in logged if line.startswith("Refusing tcp4:")]) == 48
    assert len([line for line in logged if f"no WebSocket within {deadline:g} s" in line]) == 3
    assert not [line for line in logged if "Unhandled" in line or "Traceback" in line]


@aiotest
async def test_a_stop_closes_the_connections_that_are_not_websockets_yet(redis):
    rm = await start_service(redis, handshake_timeout=60)
    try:
        reader, writer = await open_from(rm, "127.0.0.1")
        writer.write(b"GET / HTTP/1.1\r\n")
        user = await rm.user("user1")
        await eventually(lambda: rm.service.factory.connections, what="the WebSocket")
    finally:
        await rm.stop()
    assert await asyncio.wait_for(read_to_end(reader), RECV_TIMEOUT) == b""
    writer.close()
    assert (await user.closed())[1] == 1001


@aiotest
async def test_hello_rate_per_address(messenger):
    rm = await messenger(hello_rate=3)
    for i in range(3):
        client = await rm.user(f"u{i}")
        await client.close()
    client = await rm.connect()
    await client.send_json({"id": "u4"})
    error, code = await client.refused()
    assert (code, error["code"]) == (4029, "hello_rate")


@aiotest
async def test_a_hello_rate_below_one_still_lets_hellos_through(messenger):
    """At 0.5 hellos a second, one now (then one every 2 s: tests/test_limits.py)."""
    rm = await messenger(hello_rate=0.5)
    assert (await rm.user("u1")).welcome["type"] == "welcome"
    client = await rm.connect()
    await client.send_json({"id": "u2"})
    error, code = await client.refused()
    assert (code, error["code"]) == (4029, "hello_rate")


@aiotest
async def test_wss_with_an_ssl_endpoint(redis, certificate):
    from redmessenger import RedMessengerService, Settings

    key_path, cert_path = certificate
    service = RedMessengerService(Settings(
        port=f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}",
        redis=redis.address, auth=AuthMode.OFF))
    service.startService()
    try:
        port = (await tw(service.whenListening())).getHost().port
        await tw(service.subscriber.whenSubscribed())
        context = ssl.create_default_context(cafile=str(cert_path))
        client = await Client.connect(f"wss://127.0.0.1:{port}/", ssl=context)
        assert (await client.hello("user1"))["type"] == "welcome"
        redis.command("PUBLISH", "rm.users.user1", "over TLS")
        assert (await client.messages(1))[0]["payload"] == "over TLS"
        with pytest.raises(ssl.SSLCertVerificationError):
            await Client.connect(f"wss://127.0.0.1:{port}/", ssl=ssl.create_default_context())
    finally:
        await tw(service.stopService())


@aiotest
async def test_a_tls_connection_counts_and_has_its_deadline_before_its_handshake(
        redis, certificate, logged):
    """On an ``ssl:`` port the limits and the deadline sit under the TLS
    layer: a connection that never starts its TLS handshake holds its place
    until --handshake-timeout, one past the limit is closed at once
    (unanswered: an answer would need a handshake), and a WebSocket over TLS
    still works."""
    key_path, cert_path = certificate
    rm = await start_service(
        redis, port=f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}",
        max_connections=1, handshake_timeout=1.0)
    try:
        context = ssl.create_default_context(cafile=str(cert_path))
        silent = await open_from(rm, "127.0.0.1")
        with pytest.raises((OSError, websockets.InvalidHandshake)):
            await rm.connect(ssl=context)
        assert rm.dispatcher.stats.connections_refused == 1
        assert await asyncio.wait_for(read_to_end(silent[0]), RECV_TIMEOUT) == b""
        silent[1].close()
        assert rm.dispatcher.stats.handshake_timeouts == 1
        client = await rm.connect(ssl=context)
        assert (await client.hello("user1"))["type"] == "welcome"
        rm.publish("rm.users.user1", "over TLS")
        assert (await client.messages(1))[0]["payload"] == "over TLS"
        assert not [line for line in logged if "Unhandled" in line or "Traceback" in line]
    finally:
        await rm.stop()
