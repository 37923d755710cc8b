"""The dispatcher's rules as pure logic: an in-memory queue whose take
replies the test releases by hand, so every interleaving of a drain with
live messages, departures and arrivals can be placed exactly.

(The real Redis store is exercised by the end-to-end tests; this fake only
stands in where timing has to be controlled to the message.)
"""

from __future__ import annotations

import json
import random

from twisted.internet import defer

from redmessenger.delivery import Dispatcher
from redmessenger.envelope import Envelope
from redmessenger.keys import Namespace
from redmessenger.store import Taken


class Queues:
    """Per-user lists, changed at call time like Redis executes in order;
    only take's *reply* is held back until ``answer_take()``."""

    def __init__(self) -> None:
        self.lists: dict[str, list[bytes]] = {}
        self.takes: list[tuple[defer.Deferred, tuple]] = []
        self.released = 0
        self.trims: dict[str, int] = {}

    def payloads(self, uid: str) -> list[str]:
        return [json.loads(raw)["payload"] for raw in self.lists.get(uid, [])]

    def store(self, uids, envelope):
        for uid in uids:
            self.lists.setdefault(uid, []).append(envelope.stored())
        return defer.succeed(None)

    def requeue(self, uid, envelopes):
        self.lists[uid] = [e.stored() for e in envelopes] + self.lists.get(uid, [])
        return defer.succeed(None)

    def take(self, uid, count):
        items = self.lists.get(uid, [])
        taken, self.lists[uid] = items[:count], items[count:]
        d = defer.Deferred()
        self.takes.append((d, Taken(taken, len(self.lists[uid]), f"claim-{len(self.takes)}", uid)))
        return d

    def hold(self, uid, envelopes):
        d = defer.Deferred()
        self.takes.append((d, Taken([], 0, f"claim-{len(self.takes)}", uid)))
        return d

    def answer_take(self) -> None:
        d, reply = self.takes.pop(0)
        d.callback(reply)

    def pump(self) -> None:
        """Answer takes (and holds) until none is in flight: live messages
        to a user with an ack-mode socket are claimed in Redis first."""
        while self.takes:
            self.answer_take()

    def trim(self, taken, keep):
        self.trims[taken.claim] = keep  # the real store sends the last one of a turn

    def release(self, taken):
        self.trims.pop(taken.claim, None)  # as the real store: it goes whole
        self.released += 1
        return defer.succeed(None)

    def flushed(self):
        return defer.succeed(None)


class Sock:
    writable = True

    def __init__(self, uid: str, ack_mode: bool = False, name: str = "s") -> None:
        self.uid, self.ack_mode, self.peer = uid, ack_mode, name
        self.missed_bytes = 0
        self.open = True
        self.welcome: int | None = None
        self.frames: list[dict] = []
        self.closed_with: int | None = None

    def start(self, queued: int) -> None:
        assert self.welcome is None
        self.welcome = queued
        self.frames.append({"type": "welcome", "queued": queued})

    def send(self, frame: bytes) -> bool:
        if self.open:
            self.frames.append(json.loads(frame))
        return self.open

    def missed(self, size: int) -> None:
        self.missed_bytes += size

    def close(self, code, error, reason) -> None:
        self.closed_with = code
        self.open = False

    def payloads(self) -> list[str]:
        return [f["payload"] for f in self.frames if f["type"] == "message"]


def make(chunk: int = 2, window: int = 1000):
    queues = Queues()
    dispatcher = Dispatcher(
        queues,
        Namespace(),
        drain_chunk=chunk,
        max_sockets_per_user=2,
        ack_window=window,
        clock=lambda: 0.001,
    )
    count = iter(range(1, 10_000))

    def publish(payload: str, *uids: str) -> None:
        dispatcher.deliver(
            uids or ("u",), Envelope(f"m{next(count)}", "rm.users.u", 1, payload.encode())
        )

    return queues, dispatcher, publish


def test_live_messages_during_a_drain_wait_behind_the_stored_ones():
    queues, dispatcher, publish = make(chunk=2)
    for p in "abc":
        publish(p)
    sock = Sock("u")
    dispatcher.attach(sock)
    publish("live1")  # arrives while the first take is in flight
    queues.answer_take()
    assert sock.welcome == 3
    publish("live2")  # the second take is in flight now
    queues.answer_take()
    assert sock.payloads() == ["a", "b", "c", "live1", "live2"]
    assert queues.lists["u"] == [] and queues.released == 2
    publish("live3")
    assert sock.payloads()[-1] == "live3"


def test_leaving_while_a_take_is_in_flight_puts_everything_back_in_order():
    queues, dispatcher, publish = make(chunk=2)
    for p in "abcd":
        publish(p)
    sock = Sock("u")
    dispatcher.attach(sock)
    queues.answer_take()  # a, b sent; take of c, d in flight
    publish("live")  # waits behind the drain
    sock.open = False
    dispatcher.detach(sock)
    publish("after")  # the user is offline now: stored
    assert queues.payloads("u") == ["live", "after"]
    queues.answer_take()  # c, d arrive with nobody to take them
    assert sock.payloads() == ["a", "b"]
    assert queues.payloads("u") == ["c", "d", "live", "after"]
    assert dispatcher._sessions == {}  # gone, its drain ended too


def test_a_socket_joining_a_drain_in_flight_is_welcomed_with_what_follows():
    queues, dispatcher, publish = make(chunk=2)
    for p in "abc":
        publish(p)
    first = Sock("u", name="first")
    dispatcher.attach(first)
    second = Sock("u", name="second")
    dispatcher.attach(second)  # before the first take answered: no count yet
    assert second.welcome is None
    queues.answer_take()
    assert first.welcome == second.welcome == 3
    third = Sock("u", name="third")
    dispatcher.attach(third)  # closes the oldest (max 2); one message left to drain
    assert first.closed_with == 4009 and third.welcome == 1
    queues.answer_take()
    assert second.payloads() == ["a", "b", "c"] and third.payloads() == ["c"]


def test_unacked_messages_of_a_departed_socket_go_back_to_the_head():
    queues, dispatcher, publish = make(chunk=10)
    sock = Sock("u", ack_mode=True)
    dispatcher.attach(sock)
    queues.answer_take()
    for p in "abcd":
        publish(p)
    queues.pump()
    assert [f["tag"] for f in sock.frames[1:]] == [1, 2, 3, 4]
    dispatcher.ack(sock, 2)
    publish("e", "other")  # someone else's queue is not touched
    dispatcher.detach(sock)
    assert queues.payloads("u") == ["c", "d"]
    assert queues.payloads("other") == ["e"]


def test_unacked_messages_go_to_another_socket_of_the_user_first():
    queues, dispatcher, publish = make()
    acking = Sock("u", ack_mode=True, name="acking")
    dispatcher.attach(acking)
    queues.answer_take()
    publish("a")
    late = Sock("u", name="late")
    dispatcher.attach(late)
    queues.answer_take()
    dispatcher.detach(acking)
    assert late.payloads() == ["a"] and queues.payloads("u") == []


def test_a_message_acked_on_one_socket_is_not_redelivered_when_another_leaves():
    queues, dispatcher, publish = make()
    one, two = Sock("u", True, "one"), Sock("u", True, "two")
    dispatcher.attach(one)
    dispatcher.attach(two)
    queues.answer_take()
    publish("a")
    dispatcher.ack(one, 1)
    dispatcher.detach(two)
    dispatcher.detach(one)
    assert queues.payloads("u") == []


def test_a_message_no_socket_would_take_is_stored():
    queues, dispatcher, publish = make()
    sock = Sock("u")
    dispatcher.attach(sock)
    queues.answer_take()
    sock.open = False  # closing, not yet detached
    publish("a")
    assert queues.payloads("u") == ["a"]


def test_drained_messages_no_socket_would_take_go_back_to_the_head():
    queues, dispatcher, publish = make(chunk=5)
    for p in "abc":
        publish(p)
    sock = Sock("u")
    dispatcher.attach(sock)
    sock.open = False
    queues.answer_take()
    assert sock.welcome == 3 and sock.payloads() == []
    assert queues.payloads("u") == ["a", "b", "c"]


def test_stop_detaches_everyone_and_waits_for_drains():
    queues, dispatcher, publish = make(chunk=2)
    for p in "abc":
        publish(p)
    sock = Sock("u", ack_mode=True)
    dispatcher.attach(sock)
    queues.answer_take()  # a, b sent, unacked; take of c in flight
    stopped = dispatcher.stop()
    assert not stopped.called
    queues.answer_take()
    assert stopped.called
    assert queues.payloads("u") == ["a", "b", "c"]
    late = Sock("u")
    dispatcher.attach(late)
    assert late.closed_with == 1001


def test_bubble_is_on_the_newest_socket_only():
    queues, dispatcher, publish = make()
    old, new = Sock("u", name="old"), Sock("u", name="new")
    dispatcher.attach(old)
    dispatcher.attach(new)
    queues.answer_take()
    publish("a")
    assert [f["bubble"] for f in old.frames[1:]] == [False]
    assert [f["bubble"] for f in new.frames[1:]] == [True]


def test_a_failed_drain_still_welcomes_and_keeps_live_messages_flowing():
    queues, dispatcher, publish = make()
    sock = Sock("u")
    dispatcher.attach(sock)
    publish("live")
    d, _ = queues.takes.pop(0)
    d.errback(RuntimeError("WRONGTYPE"))
    assert sock.welcome == 0 and sock.payloads() == ["live"]


def test_live_messages_a_failed_hold_could_not_claim_are_stored_and_drained_in_order():
    """Claiming live messages for an ack-mode user in Redis fails only on an
    error reply: they are then stored like any others, not dropped."""
    queues, dispatcher, publish = make()
    sock = Sock("u", ack_mode=True)
    dispatcher.attach(sock)
    queues.answer_take()
    publish("a")  # claimed at once: the hold is in flight
    publish("b")  # waits behind it
    d, _ = queues.takes.pop(0)
    d.errback(RuntimeError("ERR the claim could not be made"))
    [(_, taken)] = queues.takes  # stored, and a drain is taking them back
    assert [json.loads(raw)["payload"] for raw in taken.items] == ["a", "b"]
    queues.pump()
    assert sock.payloads() == ["a", "b"] and queues.payloads("u") == []


def test_past_the_ack_window_live_messages_are_stored_then_drained_in_order():
    queues, dispatcher, publish = make(window=2)
    sock = Sock("u", ack_mode=True)
    dispatcher.attach(sock)
    queues.answer_take()
    for p in "abcd":
        publish(p)
    queues.pump()
    assert sock.payloads() == ["a", "b"]  # c and d wait, claimed in Redis
    dispatcher.ack(sock, 1)  # one place: the next one, not anything newer
    publish("e")
    queues.pump()
    assert sock.payloads() == ["a", "b", "c"]  # the window (2) is full again: paused
    dispatcher.ack(sock, 3)
    queues.pump()
    assert sock.payloads() == ["a", "b", "c", "d", "e"]
    assert [f["tag"] for f in sock.frames[1:]] == [1, 2, 3, 4, 5]
    assert queues.payloads("u") == []


def test_what_a_socket_leaves_while_a_drain_waits_for_acks_goes_before_the_rest():
    """The drain is paused on a full window when a second socket joins: it
    goes on to the second one at once. When the first one leaves, what it
    had not acknowledged is older than what the drain still holds, and the
    second socket gets it first (after what it already had: see
    docs/guarantees.rst on two ack-mode sockets)."""
    queues, dispatcher, publish = make(chunk=10, window=2)
    for p in "abcdef":
        publish(p)
    first = Sock("u", ack_mode=True, name="first")
    dispatcher.attach(first)
    queues.pump()
    assert first.payloads() == ["a", "b"]  # the rest waits for an ack
    second = Sock("u", ack_mode=True, name="second")
    dispatcher.attach(second)
    queues.pump()
    assert second.payloads() == ["c", "d"]  # no wait for the first one's ack
    dispatcher.detach(first)
    dispatcher.ack(second, 2)
    queues.pump()
    assert second.payloads() == ["c", "d", "a", "b"]  # its own window is full again
    dispatcher.ack(second, 4)
    queues.pump()
    assert second.payloads() == ["c", "d", "a", "b", "e", "f"]
    assert dispatcher.stats.redelivered == 2 and dispatcher.stats.drained == 6


def test_what_was_stored_while_a_user_was_away_mid_drain_comes_before_newer_messages():
    """The only socket leaves while a claim is in flight, a message is
    stored meanwhile, and a new socket joins before the reply: the stored
    one must be drained before newer ones go live."""
    queues, dispatcher, publish = make()
    first = Sock("u", ack_mode=True, name="first")
    dispatcher.attach(first)
    queues.answer_take()
    publish("a")  # claimed: in flight
    dispatcher.detach(first)
    publish("b")  # nobody is online: stored
    second = Sock("u", ack_mode=True, name="second")
    dispatcher.attach(second)
    publish("c")
    queues.pump()
    publish("d")
    queues.pump()
    assert second.payloads() == ["a", "b", "c", "d"] and queues.payloads("u") == []


def test_what_a_closing_socket_does_not_take_goes_back_in_order():
    """A socket in its closing handshake takes nothing more before it is
    detached: each message goes back to Redis, the newer ones behind."""
    queues, dispatcher, publish = make()
    sock = Sock("u", ack_mode=True)
    dispatcher.attach(sock)
    queues.answer_take()
    sock.open = False  # closing: not gone yet
    for p in "abc":
        publish(p)
        queues.pump()
    dispatcher.detach(sock)
    queues.pump()
    assert queues.payloads("u") == ["a", "b", "c"]


def test_a_full_ack_window_pauses_a_drain_until_acks_come():
    queues, dispatcher, publish = make(chunk=10, window=2)
    for p in "abcde":
        publish(p)
    sock = Sock("u", ack_mode=True)
    dispatcher.attach(sock)
    queues.answer_take()
    assert sock.welcome == 5 and sock.payloads() == ["a", "b"]
    dispatcher.ack(sock, 2)
    assert sock.payloads() == ["a", "b", "c", "d"]
    dispatcher.detach(sock)  # gone while paused: the rest back at the head, in order
    assert queues.payloads("u") == ["c", "d", "e"]


def test_a_plain_socket_keeps_getting_messages_while_an_ack_socket_is_full():
    queues, dispatcher, publish = make(window=1)
    acking, plain = Sock("u", True, "acking"), Sock("u", False, "plain")
    dispatcher.attach(acking)
    dispatcher.attach(plain)
    queues.answer_take()
    publish("a")
    queues.pump()
    publish("b")
    queues.pump()
    assert acking.payloads() == ["a"] and plain.payloads() == ["a", "b"]
    assert queues.payloads("u") == []


def test_a_steady_flood_through_a_small_ack_window_arrives_whole_and_in_order():
    """Acks that come while an overflow drain runs must not strand what
    overflowed meanwhile, nor let new messages overtake it."""
    queues, dispatcher, publish = make(chunk=3, window=4)
    sock = Sock("u", ack_mode=True)
    dispatcher.attach(sock)
    queues.answer_take()
    sent = 0
    for _ in range(200):
        for _ in range(3):
            publish(str(sent))
            sent += 1
        tags = [f["tag"] for f in sock.frames[1:]]
        if tags:
            dispatcher.ack(sock, tags[-1])  # the client acks what it has read
        while queues.takes:
            queues.answer_take()
    while True:  # the client keeps acking until nothing more comes
        before = len(sock.frames)
        dispatcher.ack(sock, sock.frames[-1]["tag"])
        while queues.takes:
            queues.answer_take()
        if len(sock.frames) == before:
            break
    assert [int(p) for p in sock.payloads()] == list(range(sent))
    assert queues.payloads("u") == []


def test_live_messages_left_waiting_by_an_overflow_drain_are_not_overtaken():
    queues, dispatcher, publish = make(chunk=10, window=2)
    sock = Sock("u", ack_mode=True)
    dispatcher.attach(sock)
    queues.answer_take()
    publish("a")
    publish("b")
    publish("c")
    queues.pump()
    assert sock.payloads() == ["a", "b"]  # the window is full: c waits
    dispatcher.ack(sock, 1)  # room for one: c
    publish("d")  # waits behind c
    queues.pump()
    assert sock.payloads() == ["a", "b", "c"]
    dispatcher.ack(sock, 3)  # room again: d must come now, before anything newer
    publish("e")
    queues.pump()
    assert sock.payloads() == ["a", "b", "c", "d", "e"]


def test_a_drain_claim_is_released_only_when_every_message_is_acked():
    queues, dispatcher, publish = make(chunk=10)
    for p in "abc":
        publish(p)
    sock = Sock("u", ack_mode=True)
    dispatcher.attach(sock)
    queues.answer_take()
    assert sock.payloads() == ["a", "b", "c"] and queues.released == 0
    dispatcher.ack(sock, 2)
    assert queues.released == 0  # c is not acknowledged yet
    dispatcher.ack(sock, 3)
    assert queues.released == 1


def test_a_drain_claim_is_released_once_its_unacked_messages_are_back_in_the_queue():
    queues, dispatcher, publish = make(chunk=10)
    for p in "ab":
        publish(p)
    sock = Sock("u", ack_mode=True)
    dispatcher.attach(sock)
    queues.answer_take()
    dispatcher.ack(sock, 1)
    dispatcher.detach(sock)
    assert queues.payloads("u") == ["b"] and queues.released == 1


def test_a_drain_claim_is_trimmed_as_its_head_is_acked():
    """So that after a crash only what was not acknowledged comes back."""
    queues, dispatcher, publish = make(chunk=10)
    for p in "abcd":
        publish(p)
    sock = Sock("u", ack_mode=True)
    dispatcher.attach(sock)
    queues.answer_take()
    dispatcher.ack(sock, 2)
    assert queues.trims == {"claim-0": 2} and queues.released == 0
    dispatcher.ack(sock, 4)
    assert queues.trims == {} and queues.released == 1


def test_a_recommit_redis_refuses_keeps_its_claim():
    """The claim is the only other copy: it goes only once the messages are
    back in the queue."""
    queues, dispatcher, publish = make(chunk=10)
    for p in "ab":
        publish(p)
    sock = Sock("u", ack_mode=True)
    dispatcher.attach(sock)
    queues.answer_take()
    refused = defer.Deferred()
    queues.requeue = lambda uid, envelopes: refused
    dispatcher.detach(sock)
    refused.errback(RuntimeError("OOM command not allowed when used memory > 'maxmemory'"))
    assert queues.released == 0 and queues.trims == {}
    assert dispatcher.stop().called  # a refused recommit does not hold up a stop


class FullAfter(Sock):
    """A socket whose connection is full after ``room`` frames, until the
    test empties it."""

    def __init__(self, uid: str, room: int, ack_mode: bool = False) -> None:
        super().__init__(uid, ack_mode)
        self.room = room

    @property
    def writable(self) -> bool:
        return self.room > 0

    def send(self, frame: bytes) -> bool:
        self.room -= 1
        return super().send(frame)


def test_a_drain_pauses_while_the_socket_is_full_and_goes_on_when_it_empties():
    queues, dispatcher, publish = make(chunk=10)
    for p in "abcdef":
        publish(p)
    sock = FullAfter("u", room=2)
    dispatcher.attach(sock)
    queues.answer_take()
    assert sock.payloads() == ["a", "b"]  # the rest waits in memory, claimed
    publish("g")  # live, while it is full: stored behind them
    assert queues.payloads("u") == ["g"] and sock.missed_bytes > 0
    sock.room = 3
    dispatcher.writable(sock)
    assert sock.payloads() == ["a", "b", "c", "d", "e"]
    sock.room = 10
    dispatcher.writable(sock)
    queues.pump()
    assert sock.payloads() == list("abcdefg") and queues.payloads("u") == []


def test_a_full_socket_does_not_hold_up_another_socket_of_the_user():
    """The message goes to every socket while one can take it; the full one
    counts it against --max-socket-buffer (its send), rather than holding
    the user back."""
    queues, dispatcher, publish = make()
    full = FullAfter("u", room=0)
    reader = Sock("u", name="reader")
    dispatcher.attach(full)
    dispatcher.attach(reader)
    queues.pump()
    publish("a")
    assert reader.payloads() == ["a"] and full.payloads() == ["a"]
    assert queues.payloads("u") == []


def broken_invariants(dispatcher: Dispatcher) -> list[str]:
    """The session states ``_Session``'s docstring describes, checked from
    outside: what holds whenever the dispatcher has returned."""
    window = dispatcher._window
    problems = []
    for socket, seat in dispatcher._seats.items():
        if seat not in dispatcher._sessions[socket.uid].seats:
            problems.append(f"{socket.peer} is seated outside its session")
    for uid, session in dispatcher._sessions.items():

        def wrong(why: str, uid: str = uid) -> None:
            problems.append(f"{uid}: {why}")

        if not session.seats:
            if not session.draining:
                wrong("no sockets and no drain, yet the session is kept")
            if session.waiting:
                wrong("live messages wait for no socket")
        if not session.draining:
            if session.waiting or session.returned or session.unsent:
                wrong("messages wait behind a drain that is not running")
            if session.drained is not None:
                wrong("a socket's gone waits for a drain that is not running")
            if session.remaining is None:
                wrong("no drain has answered, and none is running")
        if session.window is not None and not (session.draining and session.seats):
            wrong("a drain is paused for an ack nobody can send")
        if session.refused and not session.seats:
            wrong("refused by no socket")
        if session.overflowed and session.waiting:
            wrong("live messages wait in memory behind an overflow in Redis")
        holders: dict[int, int] = {}
        for seat in session.seats:
            if dispatcher._seats.get(seat.socket) is not seat:
                wrong(f"{seat.socket.peer} is not seated")
            if not seat.started and not (session.draining and session.remaining is None):
                wrong(f"{seat.socket.peer} is not welcomed, yet the count is known")
            tags = list(seat.unacked)
            if not seat.socket.ack_mode and tags:
                wrong(f"plain socket {seat.socket.peer} holds unacknowledged messages")
            if len(tags) > window or tags != sorted(tags) or any(t >= seat.next_tag for t in tags):
                wrong(f"{seat.socket.peer}'s window is broken: {tags}, next {seat.next_tag}")
            for outstanding in seat.unacked.values():
                holders[id(outstanding)] = holders.get(id(outstanding), 0) + 1
        for seat in session.seats:
            for outstanding in seat.unacked.values():
                if outstanding.holders != holders[id(outstanding)]:
                    wrong(
                        f"message {outstanding.envelope.id} counts {outstanding.holders} "
                        f"holders, {holders[id(outstanding)]} hold it"
                    )
                if outstanding.seq > session.sent:
                    wrong(f"message {outstanding.envelope.id} was sent after the last one")
        for outstanding in session.returned:
            if outstanding.done or outstanding.holders:
                wrong(f"message {outstanding.envelope.id} was returned, yet is held or done")
    return problems


def random_walk(seed: int, steps: int = 150) -> list[str]:
    """One user, one socket at a time (as one device reconnecting): random
    publishes, acks, Redis replies, arrivals, departures, connections that
    fill up and empty (back-pressure), and sockets that are closing (they
    take nothing) before they are gone. Then everything
    is answered and a last socket drains. What went wrong, if anything."""
    rng = random.Random(seed)
    queues = Queues()
    dispatcher = Dispatcher(
        queues,
        Namespace(),
        drain_chunk=rng.choice([1, 2, 3]),
        ack_window=rng.choice([1, 2, 3, 5]),
        clock=lambda: 0.001,
    )
    sockets: list[Sock] = []
    live: Sock | None = None
    closing: Sock | None = None
    published = 0
    for step in range(steps):
        r = rng.random()
        if r < 0.35:
            published += 1
            dispatcher.deliver(
                ("u",), Envelope(f"m{published}", "rm.users.u", 1, str(published).encode())
            )
        elif r < 0.45 and live is None and closing is None:
            live = Sock("u", ack_mode=rng.random() < 0.7, name=f"s{len(sockets)}")
            live.acks = rng.random() < 0.7  # or stops acknowledging, as a hung client
            sockets.append(live)
            dispatcher.attach(live)
        elif r < 0.49 and live is not None:
            live.open = False
            dispatcher.detach(live)
            live = None
        elif r < 0.52 and live is not None:
            live.open, closing, live = False, live, None
        elif r < 0.55 and closing is not None:
            dispatcher.detach(closing)
            closing = None
        elif r < 0.60 and live is not None:  # its connection fills up, or empties
            live.writable = not live.writable
            if live.writable:
                dispatcher.writable(live)
        elif r < 0.78 and queues.takes:
            queues.answer_take()
        elif live is not None and live.ack_mode and live.acks:
            tags = [f["tag"] for f in live.frames if f["type"] == "message"]
            if tags:
                dispatcher.ack(live, rng.choice(tags))
        if broken := broken_invariants(dispatcher):
            return [f"after step {step}: {problem}" for problem in broken]
    for sock in (live, closing):
        if sock is not None:
            sock.open = False
            dispatcher.detach(sock)
    queues.pump()
    last = Sock("u", name="last")
    sockets.append(last)
    dispatcher.attach(last)
    queues.pump()
    problems, seen = [], set()
    for sock in sockets:
        newest = 0
        for number in map(int, sock.payloads()):
            if number in seen:
                continue  # a redelivery (same id)
            seen.add(number)
            if number < newest:
                problems.append(f"{sock.peer} got {number} after {newest}")
            newest = number
    missing = set(range(1, published + 1)) - seen
    return problems + [f"never got {sorted(missing)}"] * bool(missing)


def test_random_walks_of_one_socket_at_a_time_keep_order_and_lose_nothing():
    """Each socket gets what it is sent for the first time in publish order,
    and every message arrives. (Two sockets of one user at once may see an
    older message redelivered after newer ones: each has its own window.)"""
    failed = {seed: problems for seed in range(2000) if (problems := random_walk(seed))}
    assert not failed, dict(list(failed.items())[:3])


class Leaves:
    """The cluster's presence, as the dispatcher tells it: each socket's
    gone (``G``, said at its leave, or once what it held is on its way
    back), with what the user's queue held in Redis then; and the leaves
    said early, during a drain."""

    def __init__(self, queues: Queues) -> None:
        self.queues = queues
        self.said: list[tuple[str, list[str]]] = []
        self.early: list[str] = []
        self._ids = iter(range(1, 10_000))

    def socket_id(self) -> str:
        return f"n:{next(self._ids)}"

    def join(self, uid: str, socket: str) -> defer.Deferred:
        return defer.succeed(None)

    def leave(self, uid: str, socket: str, returned: defer.Deferred | None = None) -> None:
        if returned is None:
            self.said.append((socket, self.queues.payloads(uid)))
        else:
            self.early.append(socket)
            returned.addCallback(lambda _: self.said.append((socket, self.queues.payloads(uid))))


def test_a_socket_is_gone_from_the_cluster_only_once_what_it_held_is_back_in_redis():
    """Another node drains the user once the socket is gone: what the socket
    held must be in the queue by then, also when it left mid-drain (an
    ack-mode socket is nearly always in one: live messages are claimed
    first). Its leave is said at once even then: the user may be back on
    another node, which must wait for it, not count it as open."""
    queues = Queues()
    leaves = Leaves(queues)
    dispatcher = Dispatcher(queues, Namespace(), drain_chunk=2, presence=leaves)
    sock = Sock("u", ack_mode=True)
    dispatcher.attach(sock)
    queues.answer_take()
    for payload in "ab":
        dispatcher.deliver(["u"], Envelope(payload, "rm.users.u", 1, payload.encode()))
    queues.pump()  # claimed and sent, not acknowledged
    dispatcher.deliver(["u"], Envelope("c", "rm.users.u", 1, b"c"))  # being claimed
    dispatcher.detach(sock)
    assert leaves.early == ["n:1"]
    assert leaves.said == []  # a drain is running: its end says it is gone
    queues.pump()
    assert leaves.said == [("n:1", ["a", "b", "c"])]
    # Out of a drain, at once, once what it held is requeued.
    other = Sock("u", ack_mode=True)
    dispatcher.attach(other)
    queues.pump()
    dispatcher.detach(other)
    assert leaves.said[-1] == ("n:2", ["a", "b", "c"])
