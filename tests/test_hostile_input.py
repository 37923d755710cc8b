"""Hostile input end to end: stored entries that no parser should meet,
frames nested deeper than Python's parser goes, and bad settings. Each gets
a plain answer (delivered raw, an error frame, a usage error) and harms
nothing else."""

from __future__ import annotations

import base64
import json
import subprocess

import pytest

from redmessenger.envelope import Envelope, MessageIds

from deployed import FAIL_TIMEOUT, TWISTD, assert_refused, deployed_env
from harness import aiotest, eventually
from network import HOST, pick_free_port

#: Entries another program could RPUSH into a queue, none of them an
#: envelope we can use: each must come out as it is, in its place.
HOSTILE = [
    b"[" * 5000,
    b'{"a":' * 5000,
    # An envelope but for a field nested past the parser's depth (Python
    # 3.13's parses 5,000 levels; none parses 100,000).
    b'{"id": "x", "source": "s", "timestamp": 1, "payload": "p", "extra": '
    + b"[" * 100_000 + b"]" * 100_000 + b"}",
    # An envelope (not as we write it) whose id cannot be written back as UTF-8.
    b'{"id": "\\ud800", "source": "s", "timestamp": 1, "payload": "p"}',
    b"\xff\xfe not UTF-8",
    b"",
]


def frame_payload(frame: dict) -> bytes:
    return (frame["payload"].encode("utf-8", "surrogatepass") if "payload" in frame
            else base64.b64decode(frame["payload_base64"]))


@pytest.mark.parametrize("ack", [False, True], ids=["plain", "ack"])
@aiotest
async def test_hostile_stored_entries_are_delivered_raw_in_order_and_nothing_stays_claimed(
        messenger, ack):
    """Before: a RecursionError in a take left its whole chunk claimed and
    undelivered. Every entry arrives, in order, whatever it is, and the
    queue and its claims are empty afterwards."""
    rm = await messenger(drain_chunk=4)
    ids = MessageIds()
    queue = "rm:users:user1:messages"
    entries = []
    for number, hostile in enumerate(HOSTILE):
        for i in range(3):
            envelope = Envelope(ids(), "rm.groups.g", 1, f"normal {number}.{i}".encode())
            entries.append(envelope.stored())
        entries.append(hostile)
    rm.redis.command("RPUSH", queue, *entries)
    client = await rm.user("user1", ack=ack)
    assert client.welcome["queued"] == len(entries)
    received = await client.messages(len(entries))
    if ack:
        await client.ack(received[-1]["tag"])
    expected = [json.loads(entry)["payload"].encode() if entry.startswith(b'{"id":"')
                else entry for entry in entries]
    assert [frame_payload(frame) for frame in received] == expected
    for frame, entry in zip(received, entries, strict=True):
        if entry in HOSTILE:
            assert frame["source"] == "rm.users.user1" and frame["queued"] is True
    await eventually(lambda: rm.redis.command("KEYS", "rm:users:user1:*") == [],
                     what="the queue and its claims to be empty")
    rm.publish("rm.users.user1", "live after the drain")
    assert frame_payload((await client.messages(1))[0]) == b"live after the drain"


NESTED = 20_000


@pytest.mark.parametrize(("frame", "close", "code", "reason"), [
    ('{"x":' + "[" * NESTED + "]" * NESTED + "}", 4000, "bad_hello",
     "hello is nested too deeply"),
    ("[" * NESTED, 4002, "bad_frame", "frame is nested too deeply"),
], ids=["hello", "ack"])
@aiotest
async def test_deeply_nested_frames_get_an_error_frame_and_one_log_line(
        messenger, logged, frame, close, code, reason):
    """Before: 1006 and a 40-line "Unhandled Error" traceback per frame."""
    rm = await messenger()
    client = (await rm.connect()) if close == 4000 else (await rm.user("user1", ack=True))
    await client.send(frame)
    frames, got, said = await client.closed()
    assert frames == [{"type": "error", "code": code, "reason": reason}]
    assert (got, said) == (close, reason)
    refusals = [line for line in logged if "Refusing" in line]
    assert len(refusals) == 1 and reason in refusals[0], refusals
    assert not [line for line in logged if "Unhandled" in line or "Traceback" in line], logged
    other = await rm.user("user2")  # the server is unharmed
    rm.publish("rm.users.user2", "still served")
    assert (await other.messages(1))[0]["payload"] == "still served"


@pytest.mark.parametrize(("env", "args", "needles", "secret"), [
    ({"REDMESSENGER_INBOX": "nope"}, [], ["REDMESSENGER_INBOX", "'nope'"], None),
    ({"REDMESSENGER_VERBOSE": "maybe"}, [], ["REDMESSENGER_VERBOSE", "'maybe'"], None),
    ({}, ["--redis", "redis://:s3cret-pw@127.0.0.1:port/0"],
     ["--redis", "port is not a number", ":***@"], "s3cret-pw"),
], ids=["inbox", "verbose", "redis-password"])
def test_bad_settings_stop_twistd_and_keep_secrets(tmp_path, redis, env, args, needles,
                                                   secret):
    """Before: a bad flag value was taken as off, and a bad --redis URL was
    echoed with its password."""
    args = args or ["--redis", redis.url]
    result = subprocess.run(
        [str(TWISTD), "-n", "redmessenger", "--port", f"tcp:0:interface={HOST}",
         "--embedded-port", str(pick_free_port()), *args],
        cwd=tmp_path, env=deployed_env(**env), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=FAIL_TIMEOUT)
    assert_refused(result, *needles)
    if secret is not None:
        assert secret not in result.stdout + result.stderr
