"""JWT auth, limits against abuse, and WebSocket over TLS (wss://)."""

from __future__ import annotations

import ssl
import time

import jwt
import pytest
from harness import Client, aiotest, tw

from redmessenger.settings import AuthMode

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


@aiotest
async def test_connection_limits_per_address_and_in_total(messenger):
    rm = await messenger(max_connections_per_address=2)
    first, second = await rm.connect(), await rm.connect()
    third = await rm.connect()
    error, code = await third.refused()
    assert (code, error["code"]) == (4029, "too_many_connections")
    await first.close()
    again = await rm.connect()  # a place freed up
    assert (await again.hello("user1"))["type"] == "welcome"
    await second.close()

    rm2 = await messenger(max_connections=1)
    only = await rm2.user("a")
    error, code = await (await rm2.connect()).refused()
    assert code == 4029 and "maximum of 1 connections" in error["reason"]
    rm2.publish("rm.users.a", "still served")
    assert (await only.messages(1))[0]["payload"] == "still served"


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
