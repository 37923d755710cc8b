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
