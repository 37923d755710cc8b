"""``RedMessengerClient`` against a real RedMessengerService on a real port,
with a real redis-server: delivery, ack mode, redelivery, reconnects and
refusals."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
import pytest_twisted
from twisted.internet import defer, task

from redmessenger.client import (
    Message,
    RecentIds,
    RedMessengerClient,
    Refused,
    ServerError,
    State,
    StateChange,
    Welcome,
    backoff,
)
from redmessenger.settings import AuthMode

from harness import RunningService, aiotest, eventually, run, start_service, tw


def fast(attempt: int) -> float:
    """Tests reconnect at once (no need to wait out a real backoff)."""
    return 0.05


class Recorder:
    """Everything a client reports, in order."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.welcomes: list[Welcome] = []
        self.errors: list[ServerError] = []
        self.states: list[StateChange] = []

    def callbacks(self) -> dict[str, Callable[[Any], object]]:
        return {"on_message": self.messages.append, "on_welcome": self.welcomes.append,
                "on_error": self.errors.append, "on_state": self.states.append}

    @property
    def payloads(self) -> list[bytes]:
        return [m.payload for m in self.messages]

    def count(self, state: State) -> int:
        return sum(1 for change in self.states if change.state is state)

    def close_codes(self) -> list[int | None]:
        return [c.close_code for c in self.states if c.state is State.DISCONNECTED]


@pytest.fixture
def clients() -> Iterator[Callable[..., tuple[RedMessengerClient, Recorder]]]:
    """Starts clients: ``client, seen = clients(url, uid, **options)``; all
    are stopped after the test."""
    started: list[RedMessengerClient] = []

    def start(url: str, uid: str, client_class: type[RedMessengerClient] = RedMessengerClient,
              **options: Any) -> tuple[RedMessengerClient, Recorder]:
        seen = Recorder()
        options = {"retry_policy": fast, **seen.callbacks(), **options}
        client = client_class(url, uid, **options)
        started.append(client)
        client.startService()
        return client, seen

    try:
        yield start
    finally:
        for client in started:
            pytest_twisted.blockon(client.stopService())


@pytest.fixture
def same_port(redis) -> Iterator[Callable[..., Any]]:
    """``await same_port(port, **settings)``: a new service on the port where
    a stopped one listened, as after a server restart; stopped after the test."""
    from redmessenger import RedMessengerService, Settings

    started: list[RunningService] = []

    async def start(port: int, **changes: Any) -> RunningService:
        changes.setdefault("auth", AuthMode.OFF)
        service = RedMessengerService(Settings(
            port=f"tcp:{port}:interface=127.0.0.1", redis=redis.address, **changes))
        service.startService()
        again = RunningService(service, redis)
        started.append(again)
        await tw(service.whenListening())
        await tw(service.subscriber.whenSubscribed())
        await tw(service.redis.whenConnected())
        return again

    try:
        yield start
    finally:
        for service in started:
            run(service.stop())


def port_of(rm: RunningService) -> int:
    return rm.service.port.getHost().port


# -- delivery ------------------------------------------------------------------


@aiotest
async def test_drained_and_live_messages_arrive_with_their_bytes_intact(messenger, clients):
    rm = await messenger()
    blob = bytes(range(256))  # not UTF-8: travels as payload_base64
    rm.publish("rm.users.user1", blob)
    rm.publish("rm.users.user1", "héllo ✓".encode())
    stored = await eventually(lambda: len(rm.queue("user1")) == 2 and rm.queue("user1"))

    client, seen = clients(rm.url, "user1")
    welcome = await tw(client.whenWelcomed())
    assert welcome == Welcome("user1", "rm.users.user1", queued=2, ack=False)
    await eventually(lambda: len(seen.messages) == 2, what="the drain")
    rm.publish("rm.users.user1", b"\xff\x00 live")
    await eventually(lambda: len(seen.messages) == 3, what="the live message")

    assert seen.payloads == [blob, "héllo ✓".encode(), b"\xff\x00 live"]
    assert [m.queued for m in seen.messages] == [True, True, False]
    assert [m.id for m in seen.messages[:2]] == [e["id"] for e in stored]
    assert [m.timestamp for m in seen.messages[:2]] == [e["timestamp"] for e in stored]
    assert all(m.source == "rm.users.user1" and m.bubble and m.tag is None
               for m in seen.messages)
    assert seen.welcomes == [welcome]
    assert [c.state for c in seen.states] == [State.CONNECTING, State.CONNECTED,
                                              State.WELCOMED]

    await tw(client.stopService())
    assert seen.states[-2:] == [StateChange(State.DISCONNECTED, 1000),
                                StateChange(State.STOPPED)]
    assert not client.running and client.state is State.STOPPED


@aiotest
async def test_a_group_message_arrives_with_the_group_as_its_source(messenger, clients):
    rm = await messenger()
    rm.redis.command("SADD", "rm:groups:cats:members", "user1", "user2")
    client, seen = clients(rm.url, "user1")
    await tw(client.whenWelcomed())
    rm.publish("rm.groups.cats", "Meow!")
    [meow] = await eventually(lambda: seen.messages)
    assert (meow.source, meow.payload, meow.queued) == ("rm.groups.cats", b"Meow!", False)


class AsksForHeartbeats(RedMessengerClient):
    """The client, except that its hello asks for heartbeat frames (which
    the Python client does not need: Twisted sees the pings), and that it
    notes the type of every frame it gets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frame_types: list[str] = []

    def _opened(self, proto) -> None:
        send = proto.sendMessage
        proto.sendMessage = lambda hello: send(
            json.dumps({**json.loads(hello), "heartbeat": True}).encode())
        try:
            super()._opened(proto)
        finally:
            del proto.sendMessage

    def _frame(self, proto, payload: bytes, is_binary: bool) -> None:
        self.frame_types.append(json.loads(payload)["type"])
        super()._frame(proto, payload, is_binary)


@aiotest
async def test_a_frame_of_an_unknown_type_such_as_a_heartbeat_is_ignored(messenger, clients):
    rm = await messenger(ping_interval=0.1, ping_timeout=1)
    client, seen = clients(rm.url, "user1", ack=True, ack_delay=0.01,
                           client_class=AsksForHeartbeats)
    await tw(client.whenWelcomed())
    await eventually(lambda: client.frame_types.count("heartbeat") >= 3, what="heartbeats")
    rm.publish("rm.users.user1", "one")
    rm.publish("rm.users.user1", "two")
    await eventually(lambda: len(seen.messages) == 2, what="two messages")
    assert [(m.payload, m.tag) for m in seen.messages] == [(b"one", 1), (b"two", 2)]
    await eventually(lambda: client.acked == 2, what="the ack")
    beats = client.frame_types.count("heartbeat")
    await eventually(lambda: client.frame_types.count("heartbeat") >= beats + 3,
                     what="more heartbeats")
    assert seen.errors == [] and len(seen.messages) == 2
    assert [c.state for c in seen.states] == [State.CONNECTING, State.CONNECTED,
                                              State.WELCOMED]


# -- ack mode ------------------------------------------------------------------


@aiotest
async def test_ack_mode_acks_in_batches_and_nothing_acked_comes_back(
        messenger, clients, same_port):
    """Acks go out every 4 handled messages; a server restart then gives back
    only the 2 not yet acked, which the client recognizes by their ids and
    acknowledges without handing them over again."""
    rm = await messenger()
    for i in range(10):
        rm.publish("rm.users.user1", str(i))
    originals = await eventually(lambda: len(rm.queue("user1")) == 10 and rm.queue("user1"))

    client, seen = clients(rm.url, "user1", ack=True, ack_every=4, ack_delay=None)
    assert (await tw(client.whenWelcomed())).ack is True
    await eventually(lambda: len(seen.messages) == 10, what="the drain")
    assert [m.tag for m in seen.messages] == list(range(1, 11))
    await eventually(lambda: client.acked == 8, what="the acks of 4 and 8")

    port = port_of(rm)
    await rm.stop()  # the server goes away: what was not acked goes back to Redis
    assert rm.queue("user1") == originals[8:]
    again = await same_port(port)
    second = await eventually(lambda: len(seen.welcomes) == 2 and seen.welcomes[1])
    assert second.queued == 2
    await eventually(lambda: client.duplicates == 2, what="the redelivery")
    assert seen.payloads == [str(i).encode() for i in range(10)]  # each handed over once
    assert client.delivered == 10
    assert 1001 in seen.close_codes()

    await tw(client.stopService())  # acknowledges the redelivered two on its way out
    await eventually(lambda: again.dispatcher.users == 0)
    assert again.queue("user1") == []


@aiotest
async def test_ack_mode_acks_after_a_short_delay(messenger, clients):
    rm = await messenger()
    client, seen = clients(rm.url, "user1", ack=True, ack_every=100, ack_delay=0.05)
    await tw(client.whenWelcomed())
    for i in range(3):
        rm.publish("rm.users.user1", str(i))
    await eventually(lambda: len(seen.messages) == 3)
    await eventually(lambda: client.acked == 3, what="the delayed ack")
    await rm.stop()  # would give back whatever was not acknowledged
    assert rm.queue("user1") == []


@aiotest
async def test_a_handler_deferred_holds_back_the_next_message_and_the_ack(messenger, clients):
    rm = await messenger()
    pending: list[defer.Deferred] = []
    handed: list[bytes] = []

    def slow(message: Message) -> defer.Deferred:
        handed.append(message.payload)
        pending.append(defer.Deferred())
        return pending[-1]

    client, _ = clients(rm.url, "user1", ack=True, ack_every=1, on_message=slow)
    await tw(client.whenWelcomed())
    rm.publish("rm.users.user1", "first")
    rm.publish("rm.users.user1", "second")
    await eventually(lambda: handed == [b"first"])
    await eventually(lambda: client.pending == 1, what="the second message to arrive")
    assert handed == [b"first"] and client.acked == 0

    pending[0].callback(None)
    await eventually(lambda: handed == [b"first", b"second"])
    assert client.pending == 0
    await eventually(lambda: client.acked == 1)
    pending[1].callback(None)
    await eventually(lambda: client.acked == 2)


@pytest.mark.parametrize("how", ["raises", "coroutine fails", "deferred fails"])
@aiotest
async def test_a_message_whose_handler_fails_is_not_acked_and_comes_again(
        how, messenger, clients):
    """A nack: what was handled before it is acknowledged, the connection is
    closed, and the server sends the refused message again, then the rest."""
    rm = await messenger()
    for i in range(5):
        rm.publish("rm.users.user1", str(i))
    await eventually(lambda: len(rm.queue("user1")) == 5)
    calls: list[bytes] = []

    def handler(message: Message) -> Any:
        calls.append(message.payload)
        fails = calls == [b"0", b"1", b"2"]  # the first time only
        if how == "raises" and fails:
            raise RuntimeError("not now")
        if how == "deferred fails":
            return defer.fail(RuntimeError("not now")) if fails else defer.succeed(None)

        async def later() -> None:
            await asyncio.sleep(0)
            if fails:
                raise RuntimeError("not now")
        return later()

    client, seen = clients(rm.url, "user1", ack=True, ack_every=1, on_message=handler)
    await eventually(lambda: b"4" in calls, what="the rest after the redelivery")
    assert calls == [b"0", b"1", b"2", b"2", b"3", b"4"]
    assert len(seen.welcomes) == 2 and client.duplicates == 0
    assert seen.close_codes()[0] == 1000
    await eventually(lambda: client.acked == 3, what="the acks of 2, 3 and 4")
    await tw(client.stopService())
    await eventually(lambda: rm.dispatcher.users == 0)
    assert rm.queue("user1") == []


@aiotest
async def test_a_slow_handler_leaves_messages_with_the_server_not_in_memory(
        messenger, clients):
    """The client stops reading while its handler is behind, so the server's
    slow-client policy applies (past --max-socket-buffer: stored, 4010);
    nothing is lost or handed over twice, and everything comes in order."""
    rm = await messenger(max_socket_buffer=256 * 1024)
    gate: defer.Deferred[None] = defer.Deferred()
    handled: list[int] = []

    def stuck_on_the_first(message: Message) -> defer.Deferred[None] | None:
        handled.append(int(message.payload[:5]))
        return None if gate.called else gate

    max_pending = 20
    client, seen = clients(rm.url, "user1", max_pending=max_pending,
                           on_message=stuck_on_the_first)
    await tw(client.whenWelcomed())
    count, pad = 3000, "x" * 2000  # 6 MB: more than the kernel's buffers hold

    def publish() -> None:
        """In batches much smaller than --max-socket-buffer, so that only a
        client that stops reading can fill it."""
        for start in range(0, count, 50):
            rm.redis.client().pipeline([("PUBLISH", "rm.users.user1", f"{i:05d}{pad}")
                                        for i in range(start, start + 50)])

    await asyncio.get_running_loop().run_in_executor(None, publish)
    # What one read of the socket (64 KiB) brings may come on top of max_pending.
    bound = max_pending + 64 * 1024 // len(pad) + 1

    def stored_by_the_server() -> bool:
        assert client.pending <= bound, f"{client.pending} messages held in memory"
        return bool(rm.redis.command("LLEN", "rm:users:user1:messages"))

    await eventually(stored_by_the_server, what="the server to store what it could not send")
    assert handled == [0]
    gate.callback(None)
    await eventually(lambda: len(handled) == count, timeout=30, what="every message")
    assert handled == list(range(count))
    assert seen.close_codes()[0] == 4010 and client.duplicates == 0
    assert rm.queue("user1") == []


@aiotest
async def test_a_client_stopped_while_not_reading_closes_cleanly_and_gives_all_back(
        messenger, clients):
    rm = await messenger()
    never: defer.Deferred[None] = defer.Deferred()
    client, seen = clients(rm.url, "user1", ack=True, max_pending=2,
                           on_message=lambda message: never)
    await tw(client.whenWelcomed())
    for i in range(50):
        rm.publish("rm.users.user1", f"{i:02d}" + "x" * 20_000)  # 1 MB: more than one read
    await eventually(lambda: client.pending >= 2, what="the client to stop reading")
    await tw(client.stopService())
    assert seen.close_codes() == [1000]  # the server's close frame was read, not timed out
    await eventually(lambda: len(rm.queue("user1")) == 50, what="everything given back")
    assert [e["payload"][:2] for e in rm.queue("user1")] == [f"{i:02d}" for i in range(50)]


def test_the_dedup_memory_is_bounded():
    seen = RecentIds(3)
    for message_id in "abcd":
        seen.add(message_id)
    assert len(seen) == 3 and "a" not in seen and all(i in seen for i in "bcd")
    seen.add("b")  # seen again: now the newest, so "c" is the next to go
    seen.add("e")
    assert "c" not in seen and all(i in seen for i in "bde")


def test_the_backoff_grows_to_its_ceiling_with_jitter():
    policy = backoff(initial=0.1, maximum=2.0, factor=2.0)
    for attempt, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (10, 2.0), (1000, 2.0)):
        delays = {policy(attempt) for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1


# -- reconnecting ----------------------------------------------------------------


@aiotest
async def test_it_reconnects_to_a_server_restarted_on_the_same_port(
        messenger, clients, same_port):
    rm = await messenger()
    client, seen = clients(rm.url, "user1")
    await tw(client.whenWelcomed())

    port = port_of(rm)
    await rm.stop()
    await eventually(lambda: client.state is not State.WELCOMED, what="the disconnect")
    codes = seen.close_codes()
    assert codes[0] == 1001 and set(codes[1:]) <= {None}  # None: a refused attempt
    assert seen.errors == [ServerError("shutting_down", "the server is shutting down")]
    # Connections are refused until the new server listens: the client keeps trying.
    await eventually(lambda: seen.count(State.CONNECTING) >= 3, what="refused attempts")

    again = await same_port(port)
    await tw(client.whenWelcomed())
    assert again.publish("rm.users.user1", "after the restart") == 1
    await eventually(lambda: seen.payloads == [b"after the restart"])
    assert len(seen.welcomes) == 2 and client.running


@aiotest
async def test_it_retries_a_hello_refused_while_redis_is_away(private_redis, clients):
    rm = await start_service(private_redis, auth=AuthMode.REQUIRED)
    try:
        private_redis.command("SET", "rm:users:user1:key", "s3cret")
        private_redis.stop()
        await eventually(lambda: not rm.service.redis.connected, what="the loss")
        client, seen = clients(rm.url, "user1", key="s3cret")
        await eventually(lambda: seen.close_codes().count(1013) >= 2, what="two refusals")
        assert seen.errors[0].code == "redis_unavailable" and client.running

        private_redis.start()
        welcome = await tw(client.whenWelcomed())
        assert welcome.id == "user1"
    finally:
        await rm.stop()


def kick_after_every_welcome(rm: RunningService, times: int) -> Callable[[Welcome], None]:
    """An ``on_welcome`` after which the server closes the connection (4010),
    the first ``times`` times: a server that welcomes, then closes."""
    kicked: list[Welcome] = []

    def kick(welcome: Welcome) -> None:
        if len(kicked) < times:
            kicked.append(welcome)
            for connection in list(rm.service.factory.connections):
                connection.close(4010, "too_slow", "closed by the test")

    return kick


@aiotest
async def test_the_backoff_grows_while_connections_close_soon_after_their_welcome(
        messenger, clients):
    rm = await messenger()
    attempts: list[int] = []

    def policy(attempt: int) -> float:
        attempts.append(attempt)
        return 0.01

    client, seen = clients(rm.url, "user1", retry_policy=policy, stable_after=60.0,
                           on_welcome=kick_after_every_welcome(rm, 4))
    await eventually(lambda: len(attempts) == 4 and client.state is State.WELCOMED)
    assert attempts == [1, 2, 3, 4]  # was [1, 1, 1, 1]: a reconnect storm
    assert seen.close_codes() == [4010] * 4 and client.attempts == 4


@aiotest
async def test_the_backoff_starts_over_after_a_connection_stayed_up(messenger, clients):
    rm = await messenger()
    attempts: list[int] = []

    def policy(attempt: int) -> float:
        attempts.append(attempt)
        return 0.01

    client, _ = clients(rm.url, "user1", retry_policy=policy, stable_after=1.0,
                        on_welcome=kick_after_every_welcome(rm, 2))
    await eventually(lambda: attempts == [1, 2] and client.state is State.WELCOMED)
    await eventually(lambda: client.attempts == 0, what="the connection to count as up")
    for connection in list(rm.service.factory.connections):
        connection.close(4010, "too_slow", "closed by the test")
    await eventually(lambda: len(attempts) == 3)
    assert attempts == [1, 2, 1]


JWT_SECRET = "a test secret that is long enough: 32+ bytes"


@aiotest
async def test_a_key_function_gives_a_fresh_jwt_after_the_first_expired(
        messenger, clients, same_port):
    """An expired token and a server restart used to stop the client for
    good (4001 is final): a key function is asked before every attempt."""
    rm = await messenger(auth=AuthMode.JWT, jwt_secret=JWT_SECRET)
    expiries: list[int] = []

    def fresh_token() -> str | defer.Deferred[str]:
        expiries.append(int(time.time()) + 3)
        token = jwt.encode({"sub": "user1", "exp": expiries[-1]}, JWT_SECRET,
                           algorithm="HS256")
        # Every other time a Deferred of one, as from an HTTP call.
        return token if len(expiries) % 2 else task.deferLater(rm.service.reactor, 0,
                                                                 lambda: token)

    client, seen = clients(rm.url, "user1", key=fresh_token)
    await tw(client.whenWelcomed())
    first_expiry = expiries[0]
    port = port_of(rm)
    await rm.stop()
    await eventually(lambda: time.time() > first_expiry + 1, what="the first token to expire")
    await same_port(port, auth=AuthMode.JWT, jwt_secret=JWT_SECRET)
    await eventually(lambda: len(seen.welcomes) == 2, what="the welcome with a fresh token")
    assert client.running and client.refused is None and len(expiries) >= 2
    assert "unauthorized" not in [e.code for e in seen.errors]


@aiotest
async def test_a_key_function_that_fails_fails_that_attempt_only(messenger, clients, logged):
    rm = await messenger(auth=AuthMode.REQUIRED)
    rm.redis.command("SET", "rm:users:user1:key", "s3cret")
    calls: list[int] = []

    async def key() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("the key service is down")
        return "s3cret"

    client, seen = clients(rm.url, "user1", key=key)
    assert (await tw(client.whenWelcomed())).id == "user1"
    assert len(calls) == 2 and seen.close_codes() == [None]
    assert [line for line in logged if "Could not get the key" in line] == [
        "Could not get the key for user1: the key service is down; the attempt failed"]


@aiotest
async def test_it_retries_a_server_that_is_full(messenger, clients):
    """Past --max-connections a connection is refused before its handshake
    (HTTP 503): worth retrying, not final."""
    rm = await messenger(max_connections=1)
    holder = await rm.user("holder")
    client, seen = clients(rm.url, "user1")
    await eventually(lambda: seen.count(State.DISCONNECTED) >= 2, what="two refusals")
    assert client.running and rm.dispatcher.stats.connections_refused >= 2
    await holder.close()
    assert (await tw(client.whenWelcomed())).id == "user1"


# -- refusals that are final -----------------------------------------------------


@aiotest
async def test_a_wrong_key_stops_the_client_for_good(messenger, clients):
    rm = await messenger(auth=AuthMode.REQUIRED)
    rm.redis.command("SET", "rm:users:user1:key", "right")
    client, seen = clients(rm.url, "user1", key="wrong")

    with pytest.raises(Refused) as refused:
        await tw(client.whenStopped())
    assert refused.value.close_code == 4001
    assert refused.value.error == ServerError("unauthorized", "wrong key")
    assert seen.errors == [ServerError("unauthorized", "wrong key")]
    assert seen.count(State.CONNECTING) == 1
    assert seen.states[-2:] == [StateChange(State.DISCONNECTED, 4001, "wrong key"),
                                StateChange(State.STOPPED)]
    assert not client.running and client.refused is refused.value
    with pytest.raises(Refused):
        await tw(client.whenWelcomed())
    await eventually(lambda: not rm.service.factory.connections)

    right, _ = clients(rm.url, "user1", key="right")
    assert (await tw(right.whenWelcomed())).id == "user1"
    assert seen.count(State.CONNECTING) == 1  # the refused one never came back


@aiotest
async def test_a_bad_hello_stops_the_client(messenger, clients):
    rm = await messenger()
    client, seen = clients(rm.url, "no spaces allowed")
    with pytest.raises(Refused) as refused:
        await tw(client.whenWelcomed())
    assert refused.value.close_code == 4000 and refused.value.error.code == "bad_hello"
    assert seen.count(State.CONNECTING) == 1 and not client.running


@aiotest
async def test_a_socket_replaced_by_a_newer_one_does_not_fight_back(messenger, clients):
    """4009 is final: reconnecting would close the newer socket in turn."""
    rm = await messenger(max_sockets_per_user=1)
    old, old_seen = clients(rm.url, "user1")
    await tw(old.whenWelcomed())
    new, _ = clients(rm.url, "user1")
    await tw(new.whenWelcomed())
    with pytest.raises(Refused) as refused:
        await tw(old.whenStopped())
    assert refused.value.close_code == 4009
    assert new.state is State.WELCOMED and len(rm.service.factory.connections) == 1
