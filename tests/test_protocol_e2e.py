"""The WebSocket protocol end to end: every close code and the auth rules.

Each refusal is checked three ways: the exact ``error`` frame, the exact
close code, and that nobody else noticed -- a well-behaved client of another
user, connected before the bad one, still gets a message published after
the refusal.
"""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from twisted.logger import formatEvent, globalLogPublisher
from websockets.frames import Frame, Opcode

from redmessenger.settings import AuthMode

from harness import aiotest, eventually, start_service

ID_RULE = '"id" must be at most 256 printable characters without spaces'
NEEDS_ID = 'hello needs a non-empty string "id"'
NOT_JSON = "hello is not valid JSON"
ACK_ONLY = 'after the hello only {"type": "ack", "tag": N} frames are accepted'
BAD_TAG = '"tag" must be a non-negative integer'
SHUTTING_DOWN = {"type": "error", "code": "shutting_down",
                 "reason": "the server is shutting down"}
REDIS_UNAVAILABLE = {"type": "error", "code": "redis_unavailable",
                     "reason": "Redis is unavailable; try again later"}

BYSTANDER = "bystander"
BYSTANDER_KEY = "bystander-key"

_marks = itertools.count(1)


def error(code: str, reason: str) -> dict:
    return {"type": "error", "code": code, "reason": reason}


def welcome(uid: str, ack: bool = False, queued: int = 0) -> dict:
    return {"type": "welcome", "id": uid, "channel": f"rm.users.{uid}", "queued": queued,
            "ack": ack}


@pytest.fixture
def log_events():
    """Every twisted.logger event emitted during the test."""
    events: list[dict] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def logged(events: list[dict], *words: str) -> list[str]:
    texts = [formatEvent(event) for event in list(events)]
    return [text for text in texts if all(word in text for word in words)]


async def bystander(rm):
    """A well-behaved client of another user, welcomed whatever the auth mode."""
    rm.redis.command("SET", f"rm:users:{BYSTANDER}:key", BYSTANDER_KEY)
    return await rm.user(BYSTANDER, key=BYSTANDER_KEY)


async def still_served(rm, client, uid: str = BYSTANDER) -> None:
    """A message published now is the very next frame ``client`` gets."""
    payload = f"still served #{next(_marks)}"
    rm.publish(f"rm.users.{uid}", payload)
    [message] = await client.messages(1)
    assert message["payload"] == payload


async def assert_refused(client, close_code: int, expected_error: dict) -> None:
    """The server's last words to ``client``: nothing but this error frame,
    then this close code, which carries the error's reason (documented)."""
    frames, code, reason = await client.closed()
    assert frames == [expected_error]
    assert code == close_code
    assert reason == expected_error["reason"]


def assert_refusal_logged(events, client, code: str) -> None:
    port = str(client.connection.local_address[1])
    assert logged(events, "Refusing", f":{port} ", code), \
        [formatEvent(e) for e in events if "Refusing" in formatEvent(e)]


def send_frames_at_once(client, *texts: str) -> None:
    """Several text frames in one write, so that the server reads them together."""
    client.connection.transport.write(b"".join(
        Frame(Opcode.TEXT, text.encode()).serialize(mask=True) for text in texts))


# -- 4000 bad_hello ---------------------------------------------------------

BAD_HELLOS = [
    ("{oops", NOT_JSON),
    ('{"id": "a",}', NOT_JSON),
    ('{"id": "a"} trailing', NOT_JSON),
    ("{}", NEEDS_ID),
    ('{"key": "k"}', NEEDS_ID),
    ('{"id": ""}', NEEDS_ID),
    ('{"id": 5}', NEEDS_ID),
    ('{"id": null}', NEEDS_ID),
    ('{"id": ["user1"]}', NEEDS_ID),
    ('{"id": true}', NEEDS_ID),
    ('{"id": "a b"}', ID_RULE),
    ('{"id": "a\\tb"}', ID_RULE),
    ('{"id": "a\\u0007b"}', ID_RULE),
    ('{"id": "a\\u00a0b"}', ID_RULE),
    ('{"id": "%s"}' % ("x" * 257), ID_RULE),
    ('{"id": "user1", "key": 5}', '"key" must be a string'),
    ('{"id": "user1", "key": ["k"]}', '"key" must be a string'),
    ('{"id": "user1", "ack": "yes"}', '"ack" must be true or false'),
    ('{"id": "user1", "ack": 1}', '"ack" must be true or false'),
    ('{"id": "user1", "ack": null}', '"ack" must be true or false'),
    ('{"id": "user1", "heartbeat": "yes"}', '"heartbeat" must be true or false'),
    ('{"id": "user1", "heartbeat": 1}', '"heartbeat" must be true or false'),
    ('{"id": "user1", "heartbeat": null}', '"heartbeat" must be true or false'),
    # Legacy plain-text hellos: ``user`` or ``user:key``.
    ("", NEEDS_ID),
    (":token", NEEDS_ID),
    ("user one", ID_RULE),
    ("user\x01", ID_RULE),
    ("x" * 257, ID_RULE),
    # Not starting with "{", so read as a legacy id -- which has a space.
    ("[1, 2]", ID_RULE),
]


@pytest.mark.parametrize(("hello", "reason"), BAD_HELLOS)
@aiotest
async def test_a_bad_hello_is_refused_with_4000(messenger, log_events, hello, reason):
    rm = await messenger()
    other = await bystander(rm)
    client = await rm.connect()
    await client.send(hello)
    await assert_refused(client, 4000, error("bad_hello", reason))
    assert_refusal_logged(log_events, client, "bad_hello")
    await still_served(rm, other)
    await eventually(lambda: len(rm.service.factory.connections) == 1)


GOOD_HELLOS = [
    ('{"id": "user1"}', "user1", False),
    ('{"id": "user1", "ack": true}', "user1", True),
    ('{"id": "user1", "ack": false, "key": null}', "user1", False),
    # Not asking for heartbeats is today's hello, welcomed as today.
    ('{"id": "user1", "heartbeat": false}', "user1", False),
    (' \n {"id": "user1"}', "user1", False),
    ('{"id": "user1", "type": "hello", "extra": {"x": [1]}}', "user1", False),
    ('{"id": "team.alice"}', "team.alice", False),
    ('{"id": "ünïcødé✓"}', "ünïcødé✓", False),
    ('{"id": "%s"}' % ("x" * 256), "x" * 256, False),
    # Legacy: everything up to the first colon is the id.
    ("user1", "user1", False),
    ("user1:token", "user1", False),
    ("user1:tok:en", "user1", False),
    ("user1:", "user1", False),
    # JSON that is not an object does not start with "{": a legacy id.
    ("[1]", "[1]", False),
    ("null", "null", False),
    ('"user1"', '"user1"', False),
]


@pytest.mark.parametrize(("hello", "uid", "ack"), GOOD_HELLOS)
@aiotest
async def test_a_good_hello_is_welcomed(messenger, hello, uid, ack):
    rm = await messenger()
    client = await rm.connect()
    await client.send(hello)
    assert await client.recv() == welcome(uid, ack)
    await still_served(rm, client, uid)


@aiotest
async def test_a_text_frame_that_is_not_utf8_is_closed_by_autobahn_with_1007(messenger):
    """Documented: a frame that breaks the WebSocket protocol itself is left
    to Autobahn, with no error frame; RFC 6455 says 1007 for bad UTF-8."""
    rm = await messenger()
    other = await bystander(rm)
    client = await rm.connect()
    await client.connection.send(b'{"id": "\xff"}', text=True)
    frames, code, _ = await client.closed()
    assert (frames, code) == ([], 1007)
    await still_served(rm, other)
    await eventually(lambda: len(rm.service.factory.connections) == 1)


# -- heartbeats -----------------------------------------------------------------


@aiotest
async def test_heartbeats_come_every_ping_interval_only_to_sockets_that_asked(messenger):
    rm = await messenger(ping_interval=0.2, ping_timeout=1)
    quiet = await rm.user("quiet")  # did not ask: its welcome is today's
    assert quiet.welcome == welcome("quiet")
    asking = await rm.connect()
    await asking.send_json({"id": "beating", "ack": True, "heartbeat": True})
    assert await asking.recv() == {**welcome("beating", ack=True), "heartbeat": 0.2}

    loop = asyncio.get_running_loop()
    arrivals = []
    for _ in range(4):
        assert await asking.recv(timeout=2) == {"type": "heartbeat"}
        arrivals.append(loop.time())
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(0.15 < gap < 2.0 for gap in gaps), gaps
    # Not messages: no tag is used up, nothing waits for an ack.
    rm.publish("rm.users.beating", "after the beats")
    frame = await asking.recv()
    while frame["type"] == "heartbeat":
        frame = await asking.recv()
    assert (frame["payload"], frame["tag"]) == ("after the beats", 1)
    # Four intervals went by: the socket that did not ask got nothing.
    await still_served(rm, quiet, "quiet")


@aiotest
async def test_with_pings_off_the_welcome_says_heartbeat_0(messenger):
    rm = await messenger(ping_interval=0)
    client = await rm.connect()
    await client.send_json({"id": "user1", "heartbeat": True})
    assert await client.recv() == {**welcome("user1"), "heartbeat": 0}
    await still_served(rm, client, "user1")


# -- 4001 unauthorized ----------------------------------------------------------

KEY = "s3cret"
WRONG_KEY = "wrong key"
NEEDS_KEY = "this user needs a key"
WELCOME = None

AUTH_CASES = [
    # auth, key stored for alice, hello, refusal reason (None: welcome)
    (AuthMode.REQUIRED, KEY, {"id": "alice", "key": KEY}, WELCOME),
    (AuthMode.REQUIRED, KEY, {"id": "alice", "key": KEY, "ack": True}, WELCOME),
    (AuthMode.REQUIRED, KEY, "alice:" + KEY, WELCOME),
    (AuthMode.REQUIRED, "s3:cr:et", "alice:s3:cr:et", WELCOME),
    (AuthMode.REQUIRED, "clé✓", {"id": "alice", "key": "clé✓"}, WELCOME),
    (AuthMode.REQUIRED, KEY, {"id": "alice", "key": "nope"}, WRONG_KEY),
    (AuthMode.REQUIRED, KEY, {"id": "alice", "key": KEY.upper()}, WRONG_KEY),
    (AuthMode.REQUIRED, KEY, {"id": "alice", "key": KEY[:-1]}, WRONG_KEY),
    (AuthMode.REQUIRED, KEY, {"id": "alice", "key": ""}, WRONG_KEY),
    (AuthMode.REQUIRED, KEY, "alice:nope", WRONG_KEY),
    (AuthMode.REQUIRED, KEY, "alice:", WRONG_KEY),
    (AuthMode.REQUIRED, KEY, {"id": "alice"}, NEEDS_KEY),
    (AuthMode.REQUIRED, KEY, {"id": "alice", "key": None}, NEEDS_KEY),
    (AuthMode.REQUIRED, KEY, "alice", NEEDS_KEY),
    # An unknown id is refused as a known one would be: ids cannot be probed.
    (AuthMode.REQUIRED, None, {"id": "alice", "key": KEY}, WRONG_KEY),
    (AuthMode.REQUIRED, None, {"id": "alice"}, NEEDS_KEY),
    (AuthMode.REQUIRED, None, "alice", NEEDS_KEY),
    (AuthMode.OPTIONAL, None, {"id": "alice"}, WELCOME),
    (AuthMode.OPTIONAL, None, {"id": "alice", "key": "anything"}, WELCOME),
    (AuthMode.OPTIONAL, None, "alice", WELCOME),
    (AuthMode.OPTIONAL, None, "alice:anything", WELCOME),
    (AuthMode.OPTIONAL, KEY, {"id": "alice", "key": KEY}, WELCOME),
    (AuthMode.OPTIONAL, KEY, {"id": "alice"}, NEEDS_KEY),
    (AuthMode.OPTIONAL, KEY, "alice", NEEDS_KEY),
    (AuthMode.OPTIONAL, KEY, {"id": "alice", "key": "nope"}, WRONG_KEY),
    (AuthMode.OFF, KEY, {"id": "alice", "key": "nope"}, WELCOME),
    (AuthMode.OFF, KEY, {"id": "alice"}, WELCOME),
    (AuthMode.OFF, None, {"id": "alice", "key": "anything"}, WELCOME),
    (AuthMode.OFF, None, "alice:anything", WELCOME),
]


@pytest.mark.parametrize(("auth", "stored", "hello", "reason"), AUTH_CASES,
                         ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v))
@aiotest
async def test_auth_rules(messenger, log_events, auth, stored, hello, reason):
    rm = await messenger(auth=auth)
    if stored is not None:
        rm.redis.command("SET", "rm:users:alice:key", stored)
    other = await bystander(rm)
    client = await rm.connect()
    await client.send(hello if isinstance(hello, str) else json.dumps(hello))
    if reason is WELCOME:
        ack = isinstance(hello, dict) and hello.get("ack", False)
        assert await client.recv() == welcome("alice", ack)
        await still_served(rm, client, "alice")
    else:
        await assert_refused(client, 4001, error("unauthorized", reason))
        assert_refusal_logged(log_events, client, "unauthorized")
        assert logged(log_events, "Refusing", "(alice)", reason)
    await still_served(rm, other)


@aiotest
async def test_a_key_redis_cannot_read_is_a_server_error_1013(messenger, log_events):
    rm = await messenger(auth=AuthMode.REQUIRED)
    rm.redis.command("RPUSH", "rm:users:alice:key", KEY)  # not a string: GET fails
    other = await bystander(rm)
    client = await rm.connect()
    await client.send_json({"id": "alice", "key": KEY})
    await assert_refused(client, 1013, error("server_error",
                                             "could not check the key; try again later"))
    assert logged(log_events, "Checking the hello of", "(alice) failed")
    await still_served(rm, other)


# -- 4002 bad_frame ---------------------------------------------------------------


@aiotest
async def test_a_frame_after_the_hello_of_a_plain_client_is_refused_with_4002(
        messenger, log_events):
    rm = await messenger()
    other = await bystander(rm)
    client = await rm.user("user1")
    await client.ack(1)
    await assert_refused(client, 4002, error(
        "bad_frame", "only ack-mode clients send frames after the hello"))
    assert_refusal_logged(log_events, client, "bad_frame")
    assert logged(log_events, "Refusing", "(user1)")
    await still_served(rm, other)
    await eventually(lambda: len(rm.service.factory.connections) == 1)


BAD_ACKS = [
    ("{oops", "frame is not valid JSON"),
    ("", "frame is not valid JSON"),
    ("ack 1", "frame is not valid JSON"),
    ('{"type": "nack", "tag": 1}', ACK_ONLY),
    ('{"tag": 1}', ACK_ONLY),
    ("[1]", ACK_ONLY),
    ('"ack"', ACK_ONLY),
    ("1", ACK_ONLY),
    ('{"type": "ack"}', BAD_TAG),
    ('{"type": "ack", "tag": -1}', BAD_TAG),
    ('{"type": "ack", "tag": true}', BAD_TAG),
    ('{"type": "ack", "tag": false}', BAD_TAG),
    ('{"type": "ack", "tag": 1.0}', BAD_TAG),
    ('{"type": "ack", "tag": "1"}', BAD_TAG),
    ('{"type": "ack", "tag": null}', BAD_TAG),
]


@pytest.mark.parametrize(("frame", "reason"), BAD_ACKS)
@aiotest
async def test_an_ack_mode_frame_that_is_not_an_ack_is_refused_with_4002(
        messenger, log_events, frame, reason):
    rm = await messenger()
    other = await bystander(rm)
    client = await rm.user("user1", ack=True)
    rm.publish("rm.users.user1", "one")
    [one] = await client.messages(1)
    assert one["tag"] == 1
    await client.send(frame)
    await assert_refused(client, 4002, error("bad_frame", reason))
    assert_refusal_logged(log_events, client, "bad_frame")
    await still_served(rm, other)
    # The unacknowledged message went back to the queue.
    await eventually(lambda: [e["payload"] for e in rm.queue("user1")] == ["one"])


@aiotest
async def test_good_acks_keep_an_ack_mode_connection_open(messenger):
    rm = await messenger()
    client = await rm.user("user1", ack=True)
    rm.publish("rm.users.user1", "one")
    await client.messages(1)
    for frame in ('{"type": "ack", "tag": 0}', '{"type":"ack","tag":1}',
                  '{"type": "ack", "tag": 1, "extra": true}', '{"type": "ack", "tag": 99}'):
        await client.send(frame)
    # Anything the server said about those acks would come before this.
    await still_served(rm, client, "user1")


@aiotest
async def test_a_second_frame_before_the_welcome_is_refused_with_4002(messenger, log_events):
    # With auth required the welcome waits for Redis; both frames are read at once.
    rm = await messenger(auth=AuthMode.REQUIRED)
    rm.redis.command("SET", "rm:users:alice:key", KEY)
    other = await bystander(rm)
    client = await rm.connect(compression=None)
    send_frames_at_once(client, json.dumps({"id": "alice", "key": KEY}),
                              '{"type": "ack", "tag": 1}')
    await assert_refused(client, 4002, error(
        "bad_frame", "wait for the welcome before sending more frames"))
    assert logged(log_events, "Refusing", "(alice)", "bad_frame")
    await still_served(rm, other)
    await eventually(lambda: len(rm.service.factory.connections) == 1)


# -- 4008 hello_timeout -------------------------------------------------------------


@aiotest
async def test_no_hello_in_time_is_refused_with_4008(messenger, log_events):
    rm = await messenger(hello_timeout=0.3)
    other = await bystander(rm)  # said hello in time: its timer is off
    silent = await rm.connect()
    await assert_refused(silent, 4008, error("hello_timeout", "no hello within 0.3 s"))
    assert_refusal_logged(log_events, silent, "hello_timeout")
    # The bystander's timer (started earlier) would have fired by now.
    await still_served(rm, other)


# -- 1003 binary_frame -------------------------------------------------------------

BINARY = error("binary_frame", "binary frames are not accepted; send JSON text")


@aiotest
async def test_a_binary_hello_is_refused_with_1003(messenger, log_events):
    rm = await messenger()
    other = await bystander(rm)
    client = await rm.connect()
    await client.send(json.dumps({"id": "user1"}).encode())
    await assert_refused(client, 1003, BINARY)
    assert_refusal_logged(log_events, client, "binary_frame")
    await still_served(rm, other)


@pytest.mark.parametrize("ack", [False, True])
@aiotest
async def test_a_binary_frame_after_the_hello_is_refused_with_1003(messenger, log_events, ack):
    rm = await messenger()
    other = await bystander(rm)
    client = await rm.user("user1", ack=ack)
    await client.send(json.dumps({"type": "ack", "tag": 0}).encode())
    await assert_refused(client, 1003, BINARY)
    assert_refusal_logged(log_events, client, "binary_frame")
    await still_served(rm, other)
    await eventually(lambda: len(rm.service.factory.connections) == 1)


# -- 1009 frame_too_big -------------------------------------------------------------

TOO_BIG = error("frame_too_big", "frames are limited to 1024 bytes")


@pytest.mark.parametrize("frame", ["x" * 2000, "x" * 1025, b"x" * 2000, ["x" * 600, "y" * 600]],
                         ids=["text", "one-byte-over", "binary", "fragmented"])
@aiotest
async def test_a_hello_over_max_frame_is_refused_with_1009(messenger, frame):
    rm = await messenger(max_frame=1024)
    other = await bystander(rm)
    client = await rm.connect()
    await client.send(frame)
    await assert_refused(client, 1009, TOO_BIG)
    await still_served(rm, other)


@aiotest
async def test_a_hello_of_exactly_max_frame_is_read(messenger):
    rm = await messenger(max_frame=1024)
    other = await bystander(rm)
    client = await rm.connect()
    await client.send("x" * 1024)  # read, and refused for its id's length only
    await assert_refused(client, 4000, error("bad_hello", ID_RULE))
    await still_served(rm, other)


@pytest.mark.parametrize("ack", [False, True])
@aiotest
async def test_a_frame_over_max_frame_after_the_hello_is_refused_with_1009(messenger, ack):
    rm = await messenger(max_frame=1024)
    other = await bystander(rm)
    client = await rm.user("user1", ack=ack)
    await client.send(json.dumps({"type": "ack", "tag": 0, "padding": "x" * 2000}))
    await assert_refused(client, 1009, TOO_BIG)
    await still_served(rm, other)
    await eventually(lambda: len(rm.service.factory.connections) == 1)


# -- 4009 too_many_sockets ------------------------------------------------------------


@aiotest
async def test_one_socket_too_many_closes_the_oldest_with_4009(messenger):
    rm = await messenger(max_sockets_per_user=2)
    other = await bystander(rm)
    oldest = await rm.user("user1")
    middle = await rm.user("user1")
    newest = await rm.user("user1")
    await assert_refused(oldest, 4009, error(
        "too_many_sockets", "more than 2 sockets for this user; this one was the oldest"))
    rm.publish("rm.users.user1", "to both")
    for client in (middle, newest):
        assert [m["payload"] for m in await client.messages(1)] == ["to both"]
    await still_served(rm, other)


@aiotest
async def test_with_one_socket_per_user_the_newest_socket_is_served(messenger):
    """The oldest socket was the user's only one: closing it must not end
    the session the newest one joins."""
    rm = await messenger(max_sockets_per_user=1)
    other = await bystander(rm)
    oldest = await rm.user("user1")
    newest = await rm.user("user1")
    await assert_refused(oldest, 4009, error(
        "too_many_sockets", "more than 1 sockets for this user; this one was the oldest"))
    assert rm.dispatcher.users == 2  # user1, on its newest socket, and the bystander
    await still_served(rm, newest, "user1")
    assert rm.queue("user1") == []
    await newest.close()
    await eventually(lambda: rm.dispatcher.users == 1)  # the bystander
    await still_served(rm, other)


# -- 1013 redis_unavailable ----------------------------------------------------------


async def redis_back(rm) -> None:
    await eventually(lambda: rm.service.redis.connected and rm.service.subscriber.subscribed,
                     what="the service to reconnect to Redis")


@aiotest
async def test_a_hello_while_redis_is_down_is_refused_with_1013(private_redis, log_events):
    private_redis.command("SET", "rm:users:alice:key", KEY)
    private_redis.command("SET", f"rm:users:{BYSTANDER}:key", BYSTANDER_KEY)
    rm = await start_service(private_redis, auth=AuthMode.REQUIRED)
    try:
        other = await rm.user(BYSTANDER, key=BYSTANDER_KEY)
        private_redis.stop()
        await eventually(lambda: not rm.service.redis.connected, what="Redis to be gone")
        client = await rm.connect()
        await client.send_json({"id": "alice", "key": KEY})
        await assert_refused(client, 1013, REDIS_UNAVAILABLE)
        assert_refusal_logged(log_events, client, "redis_unavailable")
        assert logged(log_events, "Cannot take the hello of", "(alice)")

        private_redis.start()
        await redis_back(rm)
        alice = await rm.user("alice", key=KEY)
        assert alice.welcome == welcome("alice")
        await still_served(rm, alice, "alice")
        await still_served(rm, other)
    finally:
        if not private_redis.running:  # a stop waits for Redis
            private_redis.start()
        await rm.stop()


@aiotest
async def test_with_auth_off_a_hello_while_redis_is_down_is_refused_too(
        private_redis, log_events):
    """No key to check, but the welcome says how many stored messages follow,
    and that needs Redis: the client is told to come back (1013) rather than
    left waiting, and its stored message is there when it does."""
    rm = await start_service(private_redis)
    try:
        other = await rm.user(BYSTANDER)
        rm.publish("rm.users.carol", "stored before the outage")
        await eventually(lambda: rm.queue("carol"))
        private_redis.stop()
        await eventually(lambda: not rm.service.redis.connected, what="Redis to be gone")
        client = await rm.connect()
        await client.send_json({"id": "carol"})
        await assert_refused(client, 1013, REDIS_UNAVAILABLE)
        assert logged(log_events, "Cannot take the hello of", "(carol)")

        private_redis.start()
        await redis_back(rm)
        carol = await rm.user("carol")
        assert carol.welcome == welcome("carol", queued=1)
        [stored] = await carol.messages(1)
        assert stored["payload"] == "stored before the outage" and stored["queued"]
        await still_served(rm, carol, "carol")
        await still_served(rm, other)
    finally:
        if not private_redis.running:  # a stop waits for Redis
            private_redis.start()
        await rm.stop()


# -- 1001 shutting_down -----------------------------------------------------------------


@aiotest
async def test_stopping_says_shutting_down_then_1001_to_every_client(messenger):
    rm = await messenger()
    plain = await rm.user("plain")
    acking = await rm.user("acking", ack=True)
    silent = await rm.connect()  # no hello yet
    rm.publish("rm.users.acking", "unacked")
    [unacked] = await acking.messages(1)

    stopping = asyncio.ensure_future(rm.stop())
    for client in (plain, acking, silent):
        await assert_refused(client, 1001, SHUTTING_DOWN)
    await stopping
    # What the ack-mode client never acknowledged is back in Redis.
    assert [e["id"] for e in rm.queue("acking")] == [unacked["id"]]
    with pytest.raises(OSError):
        await rm.connect()


async def holding_an_unacked_message(rm):
    client = await rm.user("holder", ack=True)
    rm.publish("rm.users.holder", "not acked")
    await client.messages(1)
    return client


@aiotest
async def test_a_hello_during_the_stop_gets_no_welcome(private_redis):
    # With Redis away, the stop waits for Redis to take the pending writes:
    # a window in which the service is stopping but its connections are open.
    rm = await start_service(private_redis)
    stopping = None
    try:
        await holding_an_unacked_message(rm)  # something to write back at the stop
        client = await rm.connect()
        private_redis.stop()
        await eventually(lambda: not rm.service.redis.connected, what="Redis to be gone")
        stopping = asyncio.ensure_future(rm.stop())
        await eventually(lambda: rm.dispatcher.stopping, what="the stop to begin")
        await client.send_json({"id": "late"})
        await assert_refused(client, 1001, SHUTTING_DOWN)
    finally:
        if not private_redis.running:
            private_redis.start()
        await (stopping or rm.stop())


@aiotest
async def test_a_stop_gives_up_on_redis_after_the_shutdown_timeout(private_redis, log_events):
    """Documented: wait up to shutdown_timeout for Redis, log, say goodbye."""
    rm = await start_service(private_redis, shutdown_timeout=0.2)
    client = await holding_an_unacked_message(rm)  # something to write back at the stop
    private_redis.stop()
    await eventually(lambda: not rm.service.redis.connected, what="Redis to be gone")
    stopping = asyncio.ensure_future(rm.stop())
    try:
        await assert_refused(client, 1001, SHUTTING_DOWN)
        await asyncio.wait_for(asyncio.shield(stopping), 5)
        assert logged(log_events, "Redis did not take every pending write within 0.2 s")
    finally:
        if not private_redis.running:
            private_redis.start()
        await stopping
