"""Property tests against one running RedMessenger: whatever a client sends
first, it is welcomed or refused as documented and nobody else notices;
whatever is published arrives exactly once, intact and in order.

pytest-twisted runs each hypothesis example of an ``@aiotest`` coroutine in
the reactor (``@given`` outermost): the fixtures, and so the service, are
set up once per test and shared by its examples. What must hold after the
last example is checked by the fixture's teardown.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from redmessenger.settings import AuthMode

from harness import Client, RunningService, aiotest, eventually, run, start_service, tw

MAX_FRAME = 512
KEYED, KEY = "keyed", "secret"
CONTROL = "control-7f3a"
#: Every example of every fuzz test together stays well under half a minute.
#: (No example database: nothing is written to the work tree.)
FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
#: How often (in examples) the control user is checked along the way.
CHECK_EVERY = 10

#: The refusals a hello or a frame after it may get: close code -> error code.
DOCUMENTED = {4000: "bad_hello", 4001: "unauthorized", 4002: "bad_frame",
              1003: "binary_frame", 1009: "frame_too_big", 1013: "redis_unavailable"}


@dataclass
class Fuzzed:
    rm: RunningService
    control: Client
    #: Examples begun and examples that passed: equal unless one failed.
    started: int = 0
    passed: int = 0
    outcomes: set = field(default_factory=set)
    marks: itertools.count = field(default_factory=lambda: itertools.count(1))

    async def control_still_served(self) -> None:
        """A message published now is the very next frame the control user gets."""
        payload = f"control #{next(self.marks)}"
        self.rm.publish(f"rm.users.{CONTROL}", payload)
        [message] = await self.control.messages(1)
        assert message["payload"] == payload

    async def only_control_left(self) -> None:
        rm = self.rm
        await eventually(lambda: len(rm.service.factory.connections) == 1,
                         what="the server to let go of the fuzz clients")

    @contextlib.asynccontextmanager
    async def example(self):
        """One example: starts from a clean server, even after a failed one
        (so that shrinking stays fast and honest), and leaves it clean."""
        clean = self.started == self.passed
        self.started += 1
        await self.only_control_left()
        if not clean:
            await self.resync()
        clients: list[Client] = []
        try:
            yield clients
        finally:
            for client in clients:
                client.abort()
        await self.only_control_left()
        if self.passed % CHECK_EVERY == 0:
            await self.control_still_served()
        self.passed += 1

    async def resync(self) -> None:
        """After a failed example: skip whatever the control user was left,
        and forget what the failed example's clients left stored."""
        payload = f"resync #{next(self.marks)}"
        self.rm.publish(f"rm.users.{CONTROL}", payload)
        while (await self.control.recv()).get("payload") != payload:
            pass
        await tw(self.rm.service.store.flushed())
        for key in self.rm.redis.command("KEYS", "rm:users:*:messages"):
            self.rm.redis.command("DEL", key)


@pytest.fixture
def fuzzed(redis):
    """One service (auth optional; ``keyed`` has a key) with one control
    user, for all the examples of a test; checked again after the last."""
    redis.command("SET", f"rm:users:{KEYED}:key", KEY)
    rm = run(start_service(redis, auth=AuthMode.OPTIONAL, max_frame=MAX_FRAME))
    try:
        state = Fuzzed(rm, run(rm.user(CONTROL)))
        yield state
        if state.started == state.passed:  # else the failure says it all
            assert state.passed >= FUZZ.max_examples, state.passed
            run(state.only_control_left())
            run(state.control_still_served())
            if state.outcomes:  # the hello test: it did try each way
                assert {"welcome", ("refused", 4000), ("refused", 1003)} <= state.outcomes
    finally:
        run(rm.stop())


# -- what a client may send -------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=8)
#: Ids as the docs allow them (printable, no whitespace), and others.
good_ids = st.text(st.characters(exclude_categories=("C", "Z")), min_size=1, max_size=20)
ids = st.one_of(good_ids, st.text(max_size=20), st.sampled_from([KEYED, "user1", ""]),
                st.text(min_size=250, max_size=260), json_values)
hello_docs = st.one_of(
    st.dictionaries(st.sampled_from(["id", "key", "ack", "heartbeat"]) | st.text(max_size=8),
                    json_values, max_size=5),
    st.fixed_dictionaries({"id": ids}, optional={
        "key": st.none() | st.sampled_from([KEY, "wrong"]) | json_values,
        "ack": st.booleans() | st.booleans() | json_values,
        "heartbeat": st.booleans() | json_values}),
)
#: (kind, data): "text" and "json" go in text frames, "binary" in binary
#: frames, and "raw" is bytes in a text frame (so possibly not UTF-8).
hellos = st.one_of(
    st.tuples(st.just("text"), st.text(max_size=600)),
    st.tuples(st.just("text"), st.builds(
        lambda uid, key: uid if key is None else f"{uid}:{key}",
        good_ids | st.text(max_size=20) | st.just(KEYED),
        st.none() | st.text(max_size=10) | st.just(KEY))),
    st.tuples(st.just("json"), hello_docs.map(json.dumps)),
    st.tuples(st.just("json"), st.fixed_dictionaries(
        {"id": good_ids, "ack": st.booleans()},
        optional={"key": st.none() | st.text(max_size=10)}).map(json.dumps)),
    st.tuples(st.just("binary"), st.binary(max_size=600)),
    st.tuples(st.just("raw"), st.binary(max_size=40)),
)
ack_docs = st.fixed_dictionaries({"type": st.just("ack"),
                                  "tag": st.integers(-3, 50) | json_values})
follow_ups = st.none() | st.one_of(
    st.tuples(st.just("json"), ack_docs.map(json.dumps)),
    st.tuples(st.just("json"), (ack_docs | hello_docs | json_values).map(json.dumps)),
    st.tuples(st.just("text"), st.text(max_size=600)),
    st.tuples(st.just("binary"), st.binary(max_size=40)),
)


def frame_bytes(kind: str, data) -> bytes:
    return data if isinstance(data, bytes) else data.encode("utf-8")


def valid_id(uid) -> bool:
    """Documented: 1 to 256 printable characters, no whitespace."""
    return (isinstance(uid, str) and 0 < len(uid) <= 256
            and all(c.isprintable() and not c.isspace() for c in uid))


def expected_hello(kind: str, data) -> tuple:
    """``("welcome", uid, ack, heartbeat)``, ``("refused", close code)`` or
    ``("autobahn", 1007)``, from docs/protocol.rst."""
    if len(frame_bytes(kind, data)) > MAX_FRAME:
        return ("refused", 1009)
    if kind == "binary":
        return ("refused", 1003)
    if kind == "raw":
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            return ("autobahn", 1007)
    if data.lstrip().startswith("{"):
        try:
            doc = json.loads(data)
        except ValueError:
            return ("refused", 4000)
        uid, key = doc.get("id"), doc.get("key")
        ack, heartbeat = doc.get("ack", False), doc.get("heartbeat", False)
        if ((key is not None and not isinstance(key, str)) or not isinstance(ack, bool)
                or not isinstance(heartbeat, bool)):
            return ("refused", 4000)
    else:
        uid, colon, key = data.partition(":")
        key, ack, heartbeat = (key if colon else None), False, False
    if not valid_id(uid):
        return ("refused", 4000)
    if uid == KEYED and key != KEY:
        return ("refused", 4001)
    return ("welcome", uid, ack, heartbeat)


def expected_follow_up(kind: str, data, ack_mode: bool) -> int | None:
    """The close code a frame after the welcome gets; ``None``: accepted."""
    if len(frame_bytes(kind, data)) > MAX_FRAME:
        return 1009
    if kind == "binary":
        return 1003
    if not ack_mode:
        return 4002
    try:
        doc = json.loads(data)
    except ValueError:
        return 4002
    tag = doc.get("tag") if isinstance(doc, dict) else None
    if (isinstance(doc, dict) and doc.get("type") == "ack" and isinstance(tag, int)
            and not isinstance(tag, bool) and tag >= 0):
        return None
    return 4002


async def send(client: Client, kind: str, data) -> None:
    if kind == "raw":
        await client.connection.send(data, text=True)
    else:
        await client.send(data)


async def assert_documented_refusal(client: Client, code: int) -> None:
    frames, close_code, _ = await client.closed()
    assert close_code == code
    assert close_code in DOCUMENTED
    assert [f["type"] for f in frames] == ["error"], frames
    assert frames[0]["code"] == DOCUMENTED[code]
    assert isinstance(frames[0]["reason"], str) and frames[0]["reason"]


@FUZZ
@given(hello=hellos, follow_up=follow_ups)
@aiotest
async def test_any_hello_is_welcomed_or_refused_as_documented(fuzzed, hello, follow_up):
    rm = fuzzed.rm
    expected = expected_hello(*hello)
    outcome = expected[:2] if expected[0] != "welcome" else "welcome"
    fuzzed.outcomes.add(outcome)
    event(str(outcome))
    async with fuzzed.example() as clients:
        client = await rm.connect()
        clients.append(client)
        await send(client, *hello)
        if expected[0] == "refused":
            await assert_documented_refusal(client, expected[1])
        elif expected[0] == "autobahn":
            # Documented: broken WebSocket framing is Autobahn's, with no error frame.
            frames, code, _ = await client.closed()
            assert (frames, code) == ([], 1007)
        else:
            await welcomed_then(fuzzed, client, *expected[1:], follow_up)


async def welcomed_then(fuzzed: Fuzzed, client: Client, uid: str, ack: bool,
                        heartbeat: bool, follow_up: tuple | None) -> None:
    rm = fuzzed.rm
    welcome = await client.recv()
    expected = {"type": "welcome", "id": uid, "channel": f"rm.users.{uid}", "queued": 0,
                "ack": ack}
    if heartbeat:  # the default --ping-interval: no heartbeat comes during the example
        expected["heartbeat"] = 30
    assert welcome == expected
    refusal = None if follow_up is None else expected_follow_up(*follow_up, ack)
    event(f"then {'nothing' if follow_up is None else refusal or 'a good ack'}")
    if follow_up is not None:
        await send(client, *follow_up)
    if refusal is not None:
        await assert_documented_refusal(client, refusal)
        return
    # Still open, and nothing came before this message.
    marker = f"marker #{next(fuzzed.marks)}"
    assert rm.publish(f"rm.users.{uid}", marker) == 1
    [message] = await client.messages(1)
    assert message["payload"] == marker
    if ack:
        assert message["tag"] == 1
        await client.ack(1)  # or it would go back to the user's queue
    await client.close()


# -- what may be published -----------------------------------------------------

payloads = st.lists(st.binary(max_size=2000) | st.text(max_size=300).map(str.encode),
                    min_size=1, max_size=15)


def payload_of(message: dict) -> bytes:
    """Documented: ``payload`` for UTF-8, else ``payload_base64``, never both."""
    assert ("payload" in message) != ("payload_base64" in message), message
    if "payload" in message:
        return message["payload"].encode("utf-8")
    data = base64.b64decode(message["payload_base64"], validate=True)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    raise AssertionError(f"UTF-8 payload {data!r} came as payload_base64")


@FUZZ
@given(items=payloads)
@aiotest
async def test_any_payload_reaches_an_online_user_once_intact_in_order(fuzzed, items):
    rm = fuzzed.rm
    async with fuzzed.example():
        before = rm.dispatcher.stats.received
        for item in items:
            assert rm.publish(f"rm.users.{CONTROL}", item) == 1
        received = await fuzzed.control.messages(len(items))
        assert [payload_of(m) for m in received] == items
        assert all(m["source"] == f"rm.users.{CONTROL}" and not m["queued"] for m in received)
        assert len({m["id"] for m in received}) == len(items)
        # Exactly once: the next frame is the next message published.
        await fuzzed.control_still_served()
        assert rm.dispatcher.stats.received - before == len(items) + 1
        assert rm.queue(CONTROL) == []


_offline_users = itertools.count(1)


@FUZZ
@given(items=payloads)
@aiotest
async def test_any_payload_stored_for_an_offline_user_is_drained_once_intact_in_order(
        fuzzed, items):
    rm = fuzzed.rm
    uid = f"offline-{next(_offline_users)}"
    async with fuzzed.example() as clients:
        before = rm.dispatcher.stats.received
        for item in items:
            assert rm.publish(f"rm.users.{uid}", item) == 1
        await eventually(lambda: len(rm.queue(uid)) == len(items), what="every store")
        client = await rm.user(uid)
        clients.append(client)
        assert client.welcome["queued"] == len(items)
        drained = await client.messages(len(items))
        assert [payload_of(m) for m in drained] == items
        assert all(m["queued"] for m in drained)
        assert len({m["id"] for m in drained}) == len(items)
        # Exactly once: the next frame is the next message published.
        marker = f"marker #{next(fuzzed.marks)}"
        rm.publish(f"rm.users.{uid}", marker)
        [live] = await client.messages(1)
        assert live["payload"] == marker and not live["queued"]
        assert rm.dispatcher.stats.received - before == len(items) + 1
        assert rm.queue(uid) == []
        await client.close()
