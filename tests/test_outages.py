"""Redis going away, and RedMessenger stopping: nothing that reached
RedMessenger is lost. Each test counts what went in and what came out."""

from __future__ import annotations

import asyncio
import json
import ssl

import pytest

from redmessenger.envelope import Envelope

from harness import aiotest, eventually, start_service, tw
from redisservers import kill_connection


def payloads(frames):
    return [f["payload"] for f in frames]


@aiotest
async def test_the_subscriber_resubscribes_and_sockets_stay_up_across_a_redis_restart(
        private_redis):
    rm = await start_service(private_redis)
    try:
        user1 = await rm.user("user1")
        private_redis.stop()
        await eventually(lambda: not rm.service.subscriber.subscribed, what="the loss")
        private_redis.start()
        await tw(rm.service.subscriber.whenSubscribed())
        assert rm.service.subscriber.reconnects == 1
        assert rm.publish("rm.users.user1", "after the restart") == 1
        assert payloads(await user1.messages(1)) == ["after the restart"]
    finally:
        await rm.stop()


@aiotest
async def test_an_ack_mode_client_gets_everything_once_across_a_redis_restart(private_redis):
    """Messages in flight (stored, claimed, sent, half acked) when Redis
    restarts: each arrives, none is left in Redis once all are acked."""
    rm = await start_service(private_redis, drain_chunk=50)
    try:
        user1 = await rm.user("user1", ack=True)
        private_redis.client().pipeline(
            [("PUBLISH", "rm.users.user1", str(i)) for i in range(300)])
        before = await user1.messages(100)
        await user1.ack(before[49]["tag"])  # half of what it has read
        private_redis.stop()
        await eventually(lambda: not rm.service.subscriber.subscribed, what="the loss")
        private_redis.start()
        await tw(rm.service.subscriber.whenSubscribed())
        private_redis.client().pipeline(
            [("PUBLISH", "rm.users.user1", str(i)) for i in range(300, 400)])
        received = before
        while len({f["id"] for f in received}) < 400:
            received += await user1.messages(1)
        await user1.ack(received[-1]["tag"])
        ids = [f["id"] for f in received]
        assert sorted(set(ids), key=ids.index) == ids  # exactly once: no id repeated
        assert payloads(received) == [str(i) for i in range(400)]
        await user1.close()
        await eventually(lambda: not private_redis.command("KEYS", "rm:users:user1:*"),
                         what="queue and claims to be empty")
    finally:
        await rm.stop()


@aiotest
async def test_a_drain_across_a_redis_restart_gives_every_message_in_order(private_redis):
    private_redis.client().pipeline(
        [("RPUSH", "rm:users:user1:messages", str(i)) for i in range(3000)])
    # The ack window holds the drain: Redis goes while it waits for acks.
    rm = await start_service(private_redis, drain_chunk=100, ack_window=100)
    try:
        user1 = await rm.user("user1", ack=True)
        assert user1.welcome["queued"] == 3000
        frames = await user1.messages(100)
        private_redis.stop()
        await eventually(lambda: not rm.service.redis.connected, what="the loss")
        await user1.ack(frames[-1]["tag"])  # the drain goes on: its takes wait
        private_redis.start()
        while len(frames) < 3000:
            frames += await user1.messages(100)
            await user1.ack(frames[-1]["tag"])
        assert payloads(frames) == [str(i) for i in range(3000)]
        await eventually(lambda: not private_redis.command("KEYS", "rm:users:user1:*"),
                         what="every claim settled by the acks")
    finally:
        await rm.stop()


@aiotest
async def test_a_redis_still_loading_its_data_is_tried_again_until_it_serves(private_redis,
                                                                             logged):
    """A restarted Redis answers -LOADING while it reads its files back: a
    connection made then is dropped and made again, not left waiting."""
    private_redis.client().pipeline([("SET", f"key{i}", "x") for i in range(1500)])
    private_redis.command("BGREWRITEAOF")  # an RDB base, loaded one key at a time
    await eventually(lambda: b"aof_rewrite_in_progress:0" in private_redis.command(
        "INFO", "persistence"), what="the rewrite")
    rm = await start_service(private_redis)
    try:
        private_redis.extra_args = ["--key-load-delay", "1000"]  # µs per key: 1.5 s
        private_redis.stop()
        await eventually(lambda: not rm.service.redis.connected, what="the loss")
        await asyncio.get_running_loop().run_in_executor(None, private_redis.start)
        await tw(rm.service.redis.whenConnected())
        await tw(rm.service.subscriber.whenSubscribed())
        assert any("Could not set up a connection" in line and "LOADING" in line
                   for line in logged), "no connection met Redis loading its data"
        assert rm.publish("rm.users.user1", "served") == 1
        await eventually(lambda: rm.queue("user1"), what="a store after the restart")
    finally:
        await rm.stop()


@aiotest
async def test_a_store_made_while_redis_is_down_lands_once_it_is_back(private_redis):
    rm = await start_service(private_redis)
    try:
        private_redis.stop()
        await eventually(lambda: not rm.service.redis.connected, what="the loss")
        envelope = Envelope("id-1", "rm.users.user1", 1, b"kept")
        before = rm.service.redis.pending  # a heartbeat may be waiting too
        rm.service.store.store(["user1"], envelope)
        stored = rm.service.store.flushed()
        assert not stored.called
        assert rm.service.redis.pending == before + 2  # the store, the flush
        private_redis.start()
        await tw(stored)
        assert [e["payload"] for e in rm.queue("user1")] == ["kept"]
    finally:
        await rm.stop()


@pytest.mark.alone
@aiotest
async def test_stores_cut_off_mid_flight_are_sent_again_in_order(redis, messenger):
    """The command connection is killed again and again while 2,000 messages
    for an offline user are being stored: each lands (a store whose reply
    was lost may land twice, with the same id), in publish order."""
    rm = await messenger()
    client = redis.client()
    for batch in range(10):
        client.pipeline([("PUBLISH", "rm.users.offline", str(i))
                         for i in range(batch * 200, batch * 200 + 200)])
        # The moment the last of the batch has been routed, its stores are
        # on the wire: cut the connection under them.
        await eventually(lambda n=batch * 200 + 200: rm.dispatcher.stats.received == n)
        kill_connection(redis, "commands")
        await eventually(lambda n=batch + 1: rm.service.redis.reconnects == n,
                         what="reconnect")
    await tw(rm.service.store.flushed())

    stored = rm.queue("offline")
    first_seen = list(dict.fromkeys(e["id"] for e in stored))
    by_id = {e["id"]: e["payload"] for e in stored}
    assert [by_id[i] for i in first_seen] == [str(i) for i in range(2000)]


@aiotest
async def test_a_drain_whose_reply_is_lost_gives_the_same_messages_again(redis, messenger):
    """The take of a drain is kept in a claim until its reply is in: a
    connection cut between the take and its reply loses nothing."""
    rm = await messenger(drain_chunk=50)
    for i in range(500):
        rm.publish("rm.users.user1", str(i))
    await eventually(lambda: len(rm.queue("user1")) == 500)

    user1 = await rm.connect()
    await user1.send_json({"id": "user1"})
    kill_connection(redis, "commands")  # somewhere in the drain's round trips
    frames = [await user1.recv()]
    while len(frames) < 501:
        frames.append(await user1.recv())
    assert frames[0]["type"] == "welcome"
    received = payloads(frames[1:])
    assert received == [str(i) for i in range(500)]
    await eventually(lambda: rm.service.redis.connected and not rm.dispatcher._drains)
    assert redis.command("KEYS", "rm:users:user1:taking:*") == []
    assert rm.queue("user1") == []


def test_a_live_claim_run_again_after_a_lost_reply_holds_its_messages_once(redis):
    """The script that claims an ack-mode user's live messages is sent again
    when its reply was lost with the connection: run twice, it must claim
    them once, or a kill would bring two copies back."""
    from redmessenger.store import HOLD

    claim, claims = "rm:users:user1:taking:0a1b:7", "rm:users:user1:claims"
    envelopes = [str(i).encode() for i in range(2500)]  # more than one RPUSH's worth
    for _ in range(2):
        assert redis.command("EVAL", HOLD.source, 2, claim, claims, *envelopes) == 2500
    assert redis.command("LRANGE", claim, 0, -1) == envelopes
    assert redis.command("SMEMBERS", claims, decode=True) == [claim]


@aiotest
async def test_stop_gives_unacked_and_undrained_messages_back_in_order(messenger):
    rm = await messenger(drain_chunk=10)
    for i in range(100):
        rm.publish("rm.users.user1", str(i))
    originals = await eventually(lambda: len(rm.queue("user1")) == 100 and rm.queue("user1"))
    acking = await rm.user("user1", ack=True)
    got = await acking.messages(40)
    await acking.ack(got[9]["tag"])
    await eventually(lambda: any(s.unacked and next(iter(s.unacked)) == 11
                                 for s in rm.dispatcher._seats.values()))
    bystander = await rm.user("someone-else")

    await rm.stop()

    frames, code, _ = await acking.closed()
    assert code == 1001 and frames[-1] == {"type": "error", "code": "shutting_down",
                                           "reason": "the server is shutting down"}
    error, code = await bystander.refused()
    assert code == 1001
    assert rm.queue("user1") == originals[10:]


@pytest.mark.alone
@aiotest
async def test_stop_flushes_stores_of_messages_that_just_arrived(messenger):
    rm = await messenger()
    for i in range(300):
        rm.publish("rm.users.offline", str(i))
    await eventually(lambda: rm.dispatcher.stats.received == 300)
    await rm.stop()
    assert [e["payload"] for e in rm.queue("offline")] == [str(i) for i in range(300)]


@aiotest
async def test_stop_waits_for_redis_to_come_back_within_the_timeout(private_redis):
    rm = await start_service(private_redis, shutdown_timeout=30)
    private_redis.stop()
    await eventually(lambda: not rm.service.redis.connected)
    envelope = Envelope("id-1", "rm.users.user1", 1, b"kept")
    rm.service.store.store(["user1"], envelope)
    stopping = asyncio.ensure_future(rm.stop())
    await asyncio.sleep(0.2)
    assert not stopping.done()
    private_redis.start()
    await stopping
    assert [json.loads(raw)["payload"] for raw in private_redis.command(
        "LRANGE", "rm:users:user1:messages", 0, -1)] == ["kept"]


async def user_on(messenger, certificate, tls: bool, **settings):
    """A service and a welcomed ``user1``, on a TCP or an ``ssl:`` port."""
    if not tls:
        rm = await messenger(**settings)
        return rm, await rm.user("user1")
    key_path, cert_path = certificate
    rm = await messenger(**settings, port=(
        f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"))
    return rm, await rm.user("user1", ssl=ssl.create_default_context(cafile=str(cert_path)))


@aiotest
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_a_client_too_slow_to_read_is_closed_and_loses_nothing(messenger, certificate,
                                                                     tls):
    """A client that stops reading is written to up to the high-water mark;
    then its messages wait in Redis, and once more than --max-socket-buffer
    wait for it, it is closed with 4010: nothing is lost. On an ``ssl:``
    port too, where the socket is under a TLS layer."""
    rm, slow = await user_on(messenger, certificate, tls, max_socket_buffer=64 * 1024)
    slow.connection.transport.pause_reading()  # the client stops reading
    big = "x" * 100_000
    sent = 0
    while rm.dispatcher.users:  # until the slow socket is given up
        assert sent < 2000, "the slow socket was never given up"
        rm.publish("rm.users.user1", f"{sent} {big}")
        sent += 1
        await asyncio.sleep(0)
    for i in range(sent, sent + 5):
        rm.publish("rm.users.user1", f"{i} {big}")
    sent += 5
    await eventually(lambda: rm.dispatcher.stats.received == sent)
    await tw(rm.service.store.flushed())
    slow.connection.transport.resume_reading()
    frames, code, _ = await slow.closed()
    assert code == 4010 and frames[-1]["code"] == "too_slow"
    received = [int(f["payload"].split()[0]) for f in frames[:-1]]
    stored = [int(e["payload"].split()[0]) for e in rm.queue("user1")]
    assert received + stored == list(range(sent))  # each once, in order
    assert rm.dispatcher.stats.closed_by_code[4010] == 1


@aiotest
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_a_client_behind_by_less_than_the_limit_is_kept(messenger, certificate, tls):
    """--max-socket-buffer is the limit, not the transport's default 64 KiB:
    what does not fit waits in Redis and is drained once the client reads."""
    rm, behind = await user_on(messenger, certificate, tls, max_socket_buffer=16 * 2**20)
    behind.connection.transport.pause_reading()
    big = "x" * 100_000
    for i in range(60):  # 6 MB: more than the kernel's buffers take
        rm.publish("rm.users.user1", f"{i} {big}")
    await eventually(lambda: rm.dispatcher.stats.received == 60)
    await tw(rm.service.store.flushed())
    behind.connection.transport.resume_reading()
    received = [int(f["payload"].split()[0]) for f in await behind.messages(60)]
    assert received == list(range(60)) and rm.queue("user1") == []
    assert rm.dispatcher.stats.closed_by_code[4010] == 0


@aiotest
async def test_a_peer_that_stops_answering_pings_is_given_up(messenger):
    rm = await messenger(ping_interval=0.2, ping_timeout=0.3)
    gone = await rm.user("user1")
    await asyncio.sleep(0.5)  # a few pings answered: still online
    assert rm.dispatcher.users
    gone.connection.transport.pause_reading()  # a vanished peer answers nothing
    await eventually(lambda: not rm.dispatcher.users, what="the ping timeout")
    rm.publish("rm.users.user1", "stored, not written into a dead connection")
    await eventually(lambda: rm.queue("user1"))


@aiotest
async def test_a_redis_that_is_down_at_start_is_waited_for(private_redis):
    """Started with Redis away: clients are told to come back (1013) until
    Redis is there, then everything works."""
    private_redis.stop()
    from redmessenger import RedMessengerService, Settings
    from redmessenger.settings import AuthMode

    service = RedMessengerService(Settings(port="tcp:0:interface=127.0.0.1",
                                           redis=private_redis.address, auth=AuthMode.OFF))
    service.startService()
    try:
        port = (await tw(service.whenListening())).getHost().port
        from harness import Client

        early = await Client.connect(f"ws://127.0.0.1:{port}/")
        await early.send_json({"id": "user1"})
        assert (await early.refused())[1] == 1013
        private_redis.start()
        await tw(service.subscriber.whenSubscribed())
        await tw(service.redis.whenConnected())
        user1 = await Client.connect(f"ws://127.0.0.1:{port}/")
        await user1.hello("user1")
        private_redis.command("PUBLISH", "rm.users.user1", "after the wait")
        assert payloads(await user1.messages(1)) == ["after the wait"]
    finally:
        await tw(service.stopService())


@aiotest
async def test_an_ack_mode_peer_that_vanishes_gives_back_what_it_did_not_ack(messenger):
    rm = await messenger(ping_interval=0.2, ping_timeout=0.3)
    gone = await rm.user("user1", ack=True)
    for i in range(5):
        rm.publish("rm.users.user1", str(i))
    assert payloads(await gone.messages(5)) == [str(i) for i in range(5)]
    gone.connection.transport.pause_reading()  # vanished: no pong, no ack, no FIN
    await eventually(lambda: not rm.dispatcher.users, what="the ping timeout")
    assert [e["payload"] for e in await eventually(lambda: rm.queue("user1"))] == \
        [str(i) for i in range(5)]


@aiotest
async def test_an_ack_mode_client_too_slow_to_read_loses_nothing(messenger):
    rm = await messenger(max_socket_buffer=64 * 1024)
    slow = await rm.user("user1", ack=True)
    slow.connection.transport.pause_reading()
    big = "x" * 100_000
    sent = 0
    while rm.dispatcher.users:
        assert sent < 2000, "the slow socket was never given up"
        rm.publish("rm.users.user1", f"{sent} {big}")
        sent += 1
        await asyncio.sleep(0)
    await eventually(lambda: rm.dispatcher.stats.received == sent)
    await tw(rm.service.store.flushed())
    queued = [int(e["payload"].split()[0]) for e in
              await eventually(lambda: rm.queue("user1") if len(rm.queue("user1")) == sent
                               else None, what="everything unacked back in the queue")]
    assert queued == list(range(sent))  # nothing was acked: all of it, in order
