"""Every code sample in docs/protocol.rst: the JSON frames, checked against
what a real server sends and takes."""

from __future__ import annotations

import json
import re
import time

from docsamples import MESSAGE_ID, claims, sample
from harness import aiotest, eventually


def same_shape(shown: dict, real: dict, vary: tuple[str, ...] = ("id", "timestamp")) -> None:
    """The same keys in the same order with values of the same types, and
    equal values except for those that vary from run to run."""
    assert list(shown) == list(real), (shown, real)
    for key, value in shown.items():
        assert type(value) is type(real[key]), (key, shown, real)
        if key not in vary:
            assert value == real[key], (key, shown, real)
    if "id" in vary:
        assert re.fullmatch(MESSAGE_ID, shown["id"]) and re.fullmatch(MESSAGE_ID, real["id"])
    if "timestamp" in vary:
        assert abs(real["timestamp"] / 1000 - time.time()) < 60


@claims(
    "protocol-hello-json",
    "protocol-hello-text",
    "protocol-ack",
    "protocol-welcome",
    "protocol-message",
    "protocol-error",
    "protocol-envelope",
)
@aiotest
async def test_protocol_frames_are_what_the_server_sends_and_takes(messenger, redis):
    from redmessenger.settings import AuthMode

    rm = await messenger(auth=AuthMode.OPTIONAL)
    plain, plain_with_key = sample("protocol-hello-text").splitlines()

    # Plain-text hello, a user with no key (--auth optional).
    client = await rm.connect()
    await client.send(plain)
    assert (await client.recv())["type"] == "welcome"
    await client.close()
    await eventually(lambda: rm.dispatcher.users == 0)

    # Two stored messages; the envelope is the documented one.
    redis.command("SET", "rm:users:user1:key", "s3cret")
    rm.publish("rm.users.user1", "Hello, world!")
    rm.publish("rm.users.user1", "second")
    await eventually(lambda: len(rm.queue("user1")) == 2)
    same_shape(json.loads(sample("protocol-envelope")), rm.queue("user1")[0])

    # The JSON hello, as shown, and the welcome, as shown.
    client = await rm.connect()
    await client.send(sample("protocol-hello-json"))
    assert await client.recv() == json.loads(sample("protocol-welcome"))
    await client.messages(2)
    await client.close()
    await eventually(lambda: rm.dispatcher.users == 0)

    # The plain-text hello with its key.
    client = await rm.connect()
    await client.send(plain_with_key)
    assert (await client.recv())["type"] == "welcome"
    await client.close()
    await eventually(lambda: rm.dispatcher.users == 0)

    # Ack mode: a group message, stored, third in the queue, is the message shown.
    redis.command("RPUSH", "rm:groups:cats:members", "user1")
    rm.publish("rm.users.user1", "1")
    rm.publish("rm.users.user1", "2")
    rm.publish("rm.groups.cats", "Meow!")
    await eventually(lambda: len(rm.queue("user1")) == 3)
    client = await rm.user("user1", key="s3cret", ack=True)
    frames = await client.messages(3)
    same_shape(json.loads(sample("protocol-message")), frames[2])
    # The ack shown (tag 7) acknowledges all seven messages received.
    for n in range(4):
        rm.publish("rm.users.user1", f"live {n}")
    assert [f["tag"] for f in await client.messages(4)] == [4, 5, 6, 7]
    await client.send(sample("protocol-ack"))
    await eventually(lambda: rm.dispatcher.stats.acked == 7)
    await client.close()
    await eventually(lambda: rm.dispatcher.users == 0 and rm.service.redis.pending == 0)
    assert rm.queue("user1") == [], "acknowledged messages were recommitted"

    # The error shown: a wrong key.
    client = await rm.connect()
    await client.send_json({"id": "user1", "key": "wrong"})
    error, code = await client.refused()
    assert error == json.loads(sample("protocol-error"))
    assert code == 4001


@claims("protocol-hello-heartbeat", "protocol-heartbeat")
@aiotest
async def test_protocol_heartbeats_are_what_the_server_sends(messenger):
    rm = await messenger(ping_interval=0.2)
    client = await rm.connect()
    await client.send(sample("protocol-hello-heartbeat"))
    # The documented welcome, with nothing queued, and the interval last.
    shown = {**json.loads(sample("protocol-welcome")), "queued": 0, "heartbeat": 0.2}
    welcome = await client.recv()
    assert list(welcome.items()) == list(shown.items())
    assert await client.recv() == json.loads(sample("protocol-heartbeat"))
    await client.close()


@claims("protocol-events-request", "protocol-events-stream")
@aiotest
async def test_protocol_event_stream_is_what_the_server_sends(messenger, redis):
    """The request shown, as it is (with the id of a real first message as
    its Last-Event-ID), gets the stream shown: that first message is
    acknowledged, the second comes, then a ping."""
    from redmessenger.settings import AuthMode

    from sse import EventStreamClient

    rm = await messenger(auth=AuthMode.REQUIRED, ping_interval=0.5)
    redis.command("SET", "rm:users:user1:key", "s3cret")
    rm.publish("rm.users.user1", "first")
    rm.publish("rm.users.user1", "Hello, world!")
    await eventually(lambda: len(rm.queue("user1")) == 2)
    first = rm.queue("user1")[0]["id"]
    request = sample("protocol-events-request").replace("5f0c3e1a9b2d4c77-2a", first)
    host = "Host: 127.0.0.1\n"
    raw = request.replace("\n", "\n" + host, 1).replace("\n", "\r\n") + "\r\n\r\n"
    client = await EventStreamClient.send(rm.service.port.getHost().port, raw.encode())
    rm.clients.append(client)
    assert client.status == 200
    shown = sample("protocol-events-stream").split("\n\n")
    assert shown[0] == "retry: 1000" and shown[-1] == ": ping"
    welcome, message = await client.events(2)
    await client.pings(1)
    assert client.retry == 1000 and client.comments == ["ping"]
    for block, real in zip(shown[1:3], (welcome, message), strict=True):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        assert fields["event"] == real.type
        if real.type == "welcome":
            assert json.loads(fields["data"]) == real.json()
        else:
            same_shape(json.loads(fields["data"]), real.json())
            assert real.id == real.json()["id"] and fields["id"] == json.loads(fields["data"])["id"]
    assert message.json()["payload"] == "Hello, world!"
    client.abort()
    await eventually(lambda: len(rm.queue("user1")) == 1)
    assert rm.queue("user1")[0]["payload"] == "Hello, world!"

