"""The seed's flows and the delivery rules, end to end: a real redis-server,
a RedMessengerService on a real port, real WebSocket clients (each test
twice, see the ``messenger`` fixture)."""

from __future__ import annotations

import asyncio
import base64
import threading
import time

from harness import TEST_TIMEOUT, aiotest, eventually


def payloads(frames):
    return [f["payload"] for f in frames]


@aiotest
async def test_direct_message_to_an_online_user(messenger):
    rm = await messenger()
    user1 = await rm.user("user1")
    assert user1.welcome == {"type": "welcome", "id": "user1", "channel": "rm.users.user1",
                             "queued": 0, "ack": False}

    # Heard by the node holding user1 (and by the storer, if another one).
    assert rm.publish("rm.users.user1", "Hello, world!") == (2 if rm.beside_a_storer else 1)

    [message] = await user1.messages(1)
    assert message["payload"] == "Hello, world!"
    assert message["source"] == "rm.users.user1"
    assert message["bubble"] is True and message["queued"] is False
    assert abs(message["timestamp"] - time.time() * 1000) < 60_000
    assert "tag" not in message
    assert rm.queue("user1") == []


@aiotest
async def test_offline_messages_are_stored_then_drained_in_order(messenger):
    rm = await messenger()
    rm.publish("rm.users.user1", "Hello, world!")
    rm.publish("rm.users.user1", "My life is a spicy pepper...")
    stored = await eventually(lambda: len(rm.queue("user1")) == 2 and rm.queue("user1"))
    assert [e["payload"] for e in stored] == ["Hello, world!", "My life is a spicy pepper..."]
    assert all(set(e) == {"id", "source", "timestamp", "payload"} for e in stored)

    user1 = await rm.user("user1")
    assert user1.welcome["queued"] == 2
    drained = await user1.messages(2)
    assert payloads(drained) == ["Hello, world!", "My life is a spicy pepper..."]
    assert [m["id"] for m in drained] == [e["id"] for e in stored]
    assert [m["timestamp"] for m in drained] == [e["timestamp"] for e in stored]
    assert all(m["queued"] for m in drained)
    assert rm.queue("user1") == []

    rm.publish("rm.users.user1", "live")
    [live] = await user1.messages(1)
    assert live["payload"] == "live" and live["queued"] is False


@aiotest
async def test_group_message_reaches_online_member_and_is_stored_for_offline_one(messenger):
    rm = await messenger()
    rm.redis.command("RPUSH", "rm:groups:cats:members", "user1", "user2", "user1")
    user1 = await rm.user("user1")

    rm.publish("rm.groups.cats", "Meow!")

    [meow] = await user1.messages(1)
    assert meow["payload"] == "Meow!" and meow["source"] == "rm.groups.cats"
    [stored] = await eventually(lambda: rm.queue("user2"))
    assert stored["payload"] == "Meow!" and stored["source"] == "rm.groups.cats"
    # One node gives one id to each PUBLISH; two give it one each
    # (docs/scaling.rst).
    assert (stored["id"] == meow["id"]) is not rm.beside_a_storer
    # user1 is listed twice but gets the message once: the next frame is this.
    rm.publish("rm.users.user1", "marker")
    [marker] = await user1.messages(1)
    assert marker["payload"] == "marker"

    user2 = await rm.user("user2")
    [drained] = await user2.messages(1)
    assert drained["source"] == "rm.groups.cats" and drained["queued"] is True


@aiotest
async def test_group_members_may_be_a_set(messenger):
    rm = await messenger()
    rm.redis.command("SADD", "rm:groups:dogs:members", "a", "b")
    a = await rm.user("a")
    rm.publish("rm.groups.dogs", "Woof")
    [woof] = await a.messages(1)
    assert woof["source"] == "rm.groups.dogs"
    assert [e["payload"] for e in await eventually(lambda: rm.queue("b"))] == ["Woof"]


@aiotest
async def test_group_messages_keep_publish_order_with_direct_ones(messenger):
    """A group message waits for its member lookup; what follows it must not
    overtake it, online or stored."""
    rm = await messenger()
    rm.redis.command("RPUSH", "rm:groups:g:members", "on", "off")
    on = await rm.user("on")
    expected = {"on": [], "off": []}
    for i in range(50):
        for uid in ("on", "off"):
            group = i % 3 == 0
            rm.publish("rm.groups.g" if group else f"rm.users.{uid}", f"{uid}-{i}")
            for member in (("on", "off") if group else (uid,)):
                expected[member].append(f"{uid}-{i}")
    received = await on.messages(len(expected["on"]))
    assert payloads(received) == expected["on"]
    stored = await eventually(lambda: len(rm.queue("off")) == len(expected["off"])
                              and rm.queue("off"))
    assert [e["payload"] for e in stored] == expected["off"]


@aiotest
async def test_every_socket_of_a_user_gets_each_message_and_one_bubbles(messenger):
    rm = await messenger()
    first = await rm.user("user1")
    second = await rm.user("user1")
    rm.publish("rm.users.user1", "to both")
    [a] = await first.messages(1)
    [b] = await second.messages(1)
    assert a["id"] == b["id"] and a["payload"] == b["payload"] == "to both"
    assert (a["bubble"], b["bubble"]) == (False, True)  # the newest socket bubbles
    assert rm.dispatcher.users == 1 and len(rm.service.factory.connections) == 2

    await second.close()
    await eventually(lambda: len(rm.service.factory.connections) == 1)
    rm.publish("rm.users.user1", "to the one left")
    [left] = await first.messages(1)
    assert left["bubble"] is True


@aiotest
async def test_a_socket_past_the_limit_closes_the_oldest(messenger):
    rm = await messenger(max_sockets_per_user=2)
    oldest = await rm.user("user1")
    middle = await rm.user("user1")
    newest = await rm.user("user1")
    error, code = await oldest.refused()
    assert code == 4009 and error["code"] == "too_many_sockets"
    rm.publish("rm.users.user1", "still here")
    assert payloads(await middle.messages(1)) == ["still here"]
    assert payloads(await newest.messages(1)) == ["still here"]


@aiotest
async def test_publish_order_holds_across_the_stored_to_live_boundary(messenger):
    """0..4999 published while the user connects: seen exactly once each, in
    order, whether they were stored and drained or sent live."""
    rm = await messenger(drain_chunk=100)
    half_published, hello_sent, online = threading.Event(), threading.Event(), threading.Event()

    def publish_all():
        client, i = rm.redis.client(), 0
        while i < 5000:
            if i == 2500:
                half_published.set()
                hello_sent.wait(TEST_TIMEOUT)
            if i == 4000:  # the rest once the drain has begun: some go live
                online.wait(TEST_TIMEOUT)
            step = 50 if 2500 <= i < 4000 else 500
            step = min(step, 5000 - i, 2500 - i if i < 2500 else 5000)
            client.pipeline([("PUBLISH", "rm.users.user1", str(n)) for n in range(i, i + step)])
            i += step

    publishing = asyncio.get_running_loop().run_in_executor(None, publish_all)
    await eventually(lambda: half_published.is_set(), what="2500 publishes")
    user1 = await rm.connect()
    await user1.send_json({"id": "user1"})
    hello_sent.set()  # publishing goes on while the hello is handled
    user1.welcome = await user1.recv()
    online.set()
    received = await user1.messages(5000, timeout=30)
    await publishing
    assert payloads(received) == [str(i) for i in range(5000)]
    assert len({m["id"] for m in received}) == 5000
    assert 2500 <= user1.welcome["queued"] <= 4000
    # Both ways. (Not necessarily live at the end: a client that falls
    # behind by more than its connection holds gets the rest drained.)
    assert any(m["queued"] for m in received) and not all(m["queued"] for m in received)
    assert rm.queue("user1") == []


@aiotest
async def test_ack_mode_recommits_unacked_messages_to_the_head_in_order(messenger):
    rm = await messenger(drain_chunk=10)
    for i in range(100):
        rm.publish("rm.users.user1", str(i))
    originals = await eventually(lambda: len(rm.queue("user1")) == 100 and rm.queue("user1"))

    client = await rm.user("user1", ack=True)
    assert client.welcome["ack"] is True and client.welcome["queued"] == 100
    first = await client.messages(30)
    assert [m["tag"] for m in first] == list(range(1, 31))
    await client.ack(20)
    await client.close()

    back = await eventually(lambda: len(rm.queue("user1")) == 80 and rm.queue("user1"))
    assert back == originals[20:]  # same ids, same order, nothing acked came back
    again = await rm.user("user1")
    assert payloads(await again.messages(80)) == [str(i) for i in range(20, 100)]


@aiotest
async def test_a_user_gone_mid_drain_leaves_the_rest_queued_in_order(messenger):
    rm = await messenger(drain_chunk=1)
    for i in range(200):
        rm.publish("rm.users.user1", str(i))
    originals = await eventually(lambda: len(rm.queue("user1")) == 200 and rm.queue("user1"))

    client = await rm.connect()
    await client.hello("user1")
    client.abort()
    await eventually(lambda: rm.dispatcher.users == 0 and not rm.dispatcher._drains,
                     what="the drain to end")
    left = rm.queue("user1")
    # What was handed to the connection counts as delivered; the rest is a
    # suffix of the original queue, in order, with nothing twice.
    assert 0 < len(left) <= 200
    assert left == originals[200 - len(left):]


@aiotest
async def test_ack_mode_sends_unacked_messages_to_another_socket_of_the_user(messenger):
    rm = await messenger()
    acking = await rm.user("user1", ack=True)
    other = await rm.user("user1")
    rm.publish("rm.users.user1", "one")
    assert payloads(await acking.messages(1)) == ["one"]
    assert payloads(await other.messages(1)) == ["one"]
    # The plain socket took it, so it is delivered: nothing comes back.
    await acking.close()
    await eventually(lambda: len(rm.service.factory.connections) == 1)
    rm.publish("rm.users.user1", "two")
    assert payloads(await other.messages(1)) == ["two"]
    assert rm.queue("user1") == []


@aiotest
async def test_entries_other_programs_pushed_are_delivered_not_dropped(messenger):
    rm = await messenger()
    rm.redis.command("RPUSH", "rm:users:user1:messages", "raw hello", '{"not": "ours"}')
    user1 = await rm.user("user1")
    raw, json_like = await user1.messages(2)
    assert raw["payload"] == "raw hello" and raw["source"] == "rm.users.user1"
    assert json_like["payload"] == '{"not": "ours"}'
    assert raw["queued"] and raw["id"] != json_like["id"]


@aiotest
async def test_payloads_that_are_not_utf8_arrive_intact_as_base64(messenger):
    rm = await messenger()
    blob = bytes(range(256))
    rm.publish("rm.users.user1", blob)
    await eventually(lambda: rm.queue("user1"))
    user1 = await rm.user("user1")
    rm.publish("rm.users.user1", blob)
    stored, live = await user1.messages(2)
    for frame in (stored, live):
        assert "payload" not in frame
        assert base64.b64decode(frame["payload_base64"]) == blob


@aiotest
async def test_user_ids_may_contain_dots_and_the_prefix_is_configurable(messenger):
    rm = await messenger(prefix="app")
    rm.publish("app.users.team.alice", "hi")
    await eventually(lambda: rm.redis.command("LRANGE", "app:users:team.alice:messages", 0, -1))
    alice = await rm.user("team.alice")
    assert alice.welcome["channel"] == "app.users.team.alice"
    assert payloads(await alice.messages(1)) == ["hi"]
    assert rm.publish("rm.users.team.alice", "other prefix") == 0


@aiotest
async def test_queue_max_keeps_the_newest_and_queue_ttl_expires(messenger):
    rm = await messenger(queue_max=3, queue_ttl=100)
    for i in range(5):
        rm.publish("rm.users.user1", str(i))
    await eventually(lambda: rm.redis.command("TTL", "rm:users:user1:messages") > 0)
    await eventually(lambda: [e["payload"] for e in rm.queue("user1")] == ["2", "3", "4"])
    assert 0 < rm.redis.command("TTL", "rm:users:user1:messages") <= 100


@aiotest
async def test_messages_larger_than_the_client_frame_limit_are_delivered(messenger):
    """--max-frame limits what clients send, never what they receive."""
    rm = await messenger(max_frame=1024)
    big = "x" * 200_000
    rm.publish("rm.users.user1", big)
    await eventually(lambda: rm.queue("user1"))
    user1 = await rm.user("user1")
    rm.publish("rm.users.user1", big + "live")
    stored, live = await user1.messages(2)
    assert stored["payload"] == big and live["payload"] == big + "live"


@aiotest
async def test_past_the_ack_window_messages_wait_in_redis_for_acks(messenger):
    rm = await messenger(ack_window=10)
    client = await rm.user("user1", ack=True)
    for i in range(30):
        rm.publish("rm.users.user1", str(i))
    first = await client.messages(10)
    assert payloads(first) == [str(i) for i in range(10)]
    def in_redis() -> int:  # the queue, and what drains hold claimed until acked
        claims = rm.redis.command("KEYS", "rm:users:user1:taking:*")
        return len(rm.queue("user1")) + sum(rm.redis.command("LLEN", k) for k in claims)

    await eventually(lambda: in_redis() == 30, what="every unacked message kept in Redis")
    await client.ack(first[-1]["tag"])  # the window opens: the overflow is drained
    rest = await client.messages(10)
    await client.ack(rest[-1]["tag"])
    rest += await client.messages(10)
    assert payloads(rest) == [str(i) for i in range(10, 30)]
    assert [m["tag"] for m in first + rest] == list(range(1, 31))
    await client.ack(30)
    await eventually(lambda: rm.dispatcher.stats.acked == 30)
    assert rm.queue("user1") == []


@aiotest
async def test_a_stuck_ack_socket_does_not_hold_up_the_users_new_one(messenger):
    """The user's old client has a full window and acks nothing; the new
    one gets the rest of the drain at once. When the old one goes, what it
    held reaches the new one too: all nine, each acked once, none left in
    Redis."""
    rm = await messenger(ack_window=3)
    for i in range(9):
        rm.publish("rm.users.user1", str(i))
    await eventually(lambda: len(rm.queue("user1")) == 9)
    stuck = await rm.user("user1", ack=True)
    assert payloads(await stuck.messages(3)) == ["0", "1", "2"]
    fresh = await rm.user("user1", ack=True)
    got = await fresh.messages(3)  # without an ack from the stuck one
    assert payloads(got) == ["3", "4", "5"]
    stuck.abort()
    await eventually(lambda: len(rm.service.factory.connections) == 1, what="the abort seen")
    await fresh.ack(got[-1]["tag"])
    back = await fresh.messages(3)  # what the stuck one held goes first
    await fresh.ack(back[-1]["tag"])
    rest = await fresh.messages(3)
    assert payloads(back) == ["0", "1", "2"] and payloads(rest) == ["6", "7", "8"]
    await fresh.ack(rest[-1]["tag"])
    await eventually(lambda: rm.dispatcher.stats.acked == 9)
    await eventually(lambda: not rm.redis.command("KEYS", "rm:users:user1:taking:*"),
                     what="every claim released")
    assert rm.queue("user1") == []
