"""Delivery follows each socket's back-pressure: a drain writes up to the
connection's high-water mark and goes on once it has written that out, so
a client that reads takes a backlog of any size, and one message of any
size, in one connection. --max-socket-buffer is only for clients that fall
that far behind. Real server, real Redis, real clients."""

from __future__ import annotations

import asyncio

import pytest

from harness import aiotest, eventually, tw


async def read_all(client, count: int, ack: bool) -> list[str]:
    """Read ``count`` messages as a client at a normal pace would, acking
    each one in ack mode."""
    payloads = []
    for _ in range(count):
        frame = await client.recv()
        assert frame["type"] == "message", frame
        payloads.append(frame["payload"])
        if ack:
            await client.ack(frame["tag"])
    return payloads


def no_claims_left(rm, uid: str) -> bool:
    return not rm.redis.command("KEYS", f"rm:users:{uid}:taking:*") and \
        not rm.redis.command("EXISTS", f"rm:users:{uid}:claims")


@aiotest
@pytest.mark.parametrize("ack", [False, True], ids=["plain", "ack"])
async def test_a_backlog_bigger_than_the_socket_buffer_drains_in_one_connection(messenger,
                                                                                ack):
    """1,500 stored messages of 3 KB (4.5 MB: several times the high-water
    mark) and a 256 KiB --max-socket-buffer: before, each connection was
    closed with 4010 part-way and, in ack mode, everything went back to the
    head, so the queue never shrank."""
    rm = await messenger(max_socket_buffer=256 * 1024)
    body = "x" * 3000
    rm.redis.client().pipeline([("PUBLISH", "rm.users.user1", f"{i} {body}")
                                for i in range(1500)])
    await eventually(lambda: len(rm.queue("user1")) == 1500)
    user1 = await rm.user("user1", ack=ack)
    assert user1.welcome["queued"] == 1500
    received = await read_all(user1, 1500, ack)
    assert [int(p.split()[0]) for p in received] == list(range(1500))
    assert rm.dispatcher.stats.closed_by_code[4010] == 0
    assert rm.dispatcher.users == 1
    await eventually(lambda: no_claims_left(rm, "user1") and not rm.queue("user1"),
                     what="the queue and claims to be empty")


@aiotest
@pytest.mark.parametrize("ack", [False, True], ids=["plain", "ack"])
@pytest.mark.parametrize("stored", [False, True], ids=["live", "stored"])
async def test_one_message_bigger_than_the_socket_buffer_is_delivered(messenger, ack, stored):
    """A 1.5 MB payload with the default 1 MiB --max-socket-buffer: an empty
    buffer always takes the next message, whatever its size."""
    rm = await messenger()
    big = "y" * 1_500_000
    if stored:
        rm.publish("rm.users.user1", f"0 {big}")
        await eventually(lambda: rm.queue("user1"))
    user1 = await rm.user("user1", ack=ack)
    if not stored:
        rm.publish("rm.users.user1", f"0 {big}")
    for i in range(1, 3):  # and more behind it
        rm.publish("rm.users.user1", f"{i} {big}")
    received = await read_all(user1, 3, ack)
    assert received == [f"{i} {big}" for i in range(3)]
    assert rm.dispatcher.stats.closed_by_code[4010] == 0
    await eventually(lambda: no_claims_left(rm, "user1") and not rm.queue("user1"),
                     what="the queue and claims to be empty")


@aiotest
async def test_live_messages_wait_in_redis_while_the_socket_is_full_and_keep_their_order(
        messenger):
    """A burst bigger than what the connection holds: what does not fit
    waits in Redis (not in memory) and follows, in order, once the client
    has read what was written."""
    rm = await messenger(max_socket_buffer=64 * 2**20)
    user1 = await rm.user("user1")
    user1.connection.transport.pause_reading()
    body = "z" * 50_000
    count = 400  # 20 MB: more than the kernel's buffers take
    for i in range(count):
        rm.publish("rm.users.user1", f"{i} {body}")
    await eventually(lambda: rm.dispatcher.stats.received == count)
    await tw(rm.service.store.flushed())
    protocol = next(iter(rm.service.factory.connections))
    assert not protocol.writable  # the client stopped reading: it is full
    # so the rest waits in Redis: queued, or claimed by a drain paused on it
    assert rm.queue("user1") or rm.redis.command("KEYS", "rm:users:user1:taking:*")
    user1.connection.transport.resume_reading()
    received = await read_all(user1, count, ack=False)
    assert [int(p.split()[0]) for p in received] == list(range(count))
    stats = rm.dispatcher.stats
    assert stats.delivered_live + stats.drained == count
    assert stats.closed_by_code[4010] == 0
    await eventually(lambda: no_claims_left(rm, "user1") and not rm.queue("user1"),
                     what="the queue and claims to be empty")


@aiotest
async def test_a_second_socket_that_falls_behind_its_sibling_is_given_up(messenger):
    """Two sockets of one user: one reads, the other stopped. Messages go
    on to the reader; the stopped one is written to until more than
    --max-socket-buffer waits for it, then closed with 4010. The reader
    gets everything."""
    rm = await messenger(max_socket_buffer=256 * 1024)
    stopped = await rm.user("user1")
    reader = await rm.user("user1")
    stopped.connection.transport.pause_reading()
    body = "w" * 20_000
    sent = 0
    while not rm.dispatcher.stats.closed_by_code[4010]:
        assert sent < 5000, "the stopped socket was never given up"
        rm.publish("rm.users.user1", f"{sent} {body}")
        sent += 1
        assert int((await reader.recv())["payload"].split()[0]) == sent - 1
        await asyncio.sleep(0)
    assert rm.dispatcher.stats.closed_by_code[4010] == 1  # the stopped one only
    rm.publish("rm.users.user1", f"{sent} {body}")
    assert int((await reader.recv())["payload"].split()[0]) == sent
