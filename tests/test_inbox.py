"""``--inbox``: messages XADDed to ``rm:inbox`` survive RedMessenger being
down or dying between reading and acknowledging them."""

from __future__ import annotations

import pytest

from harness import aiotest, eventually, tw
from redisservers import kill_connection


def pending(redis) -> int:
    return redis.command("XPENDING", "rm:inbox", "redmessenger")[0]


@aiotest
async def test_entries_added_while_no_redmessenger_ran_are_delivered(redis, messenger):
    redis.command("RPUSH", "rm:groups:cats:members", "user1", "user2")
    first = redis.command("XADD", "rm:inbox", "*", "to", "users.user1", "payload", "hello")
    redis.command("XADD", "rm:inbox", "*", "to", "groups.cats", "payload", "meow")
    rm = await messenger(inbox=True)
    await eventually(lambda: len(rm.queue("user1")) == 2 and len(rm.queue("user2")) == 1,
                     what="the inbox to be stored")
    await eventually(lambda: pending(redis) == 0, what="the entries to be acknowledged")
    user1 = await rm.user("user1")
    hello, meow = await user1.messages(2)
    assert (hello["payload"], hello["source"]) == ("hello", "rm.users.user1")
    assert hello["id"] == f"inbox-{first.decode()}"
    assert (meow["payload"], meow["source"]) == ("meow", "rm.groups.cats")
    # For a user who is connected: stored, and drained to it at once.
    redis.command("XADD", "rm:inbox", "*", "to", "users.user1", "payload", "live")
    [live] = await user1.messages(1)
    assert live["payload"] == "live" and live["queued"] is True


@aiotest
async def test_entries_a_dead_reader_left_unacknowledged_are_taken_over(redis, messenger):
    redis.command("XGROUP", "CREATE", "rm:inbox", "redmessenger", "0", "MKSTREAM")
    entry = redis.command("XADD", "rm:inbox", "*", "to", "users.user1", "payload", "kept")
    # A RedMessenger on another host read it, then stopped reading; its
    # heartbeat has not expired yet, so only the claim timeout can tell.
    redis.command("XREADGROUP", "GROUP", "redmessenger", "stuck", "COUNT", "10", "STREAMS",
                  "rm:inbox", ">")
    redis.command("SET", "rm:procs:stuck", "elsewhere 1", "EX", 60)
    assert pending(redis) == 1
    rm = await messenger(inbox=True, inbox_claim_after=0.05)
    [stored] = await eventually(lambda: rm.queue("user1"), what="the entry to be taken over")
    assert stored["payload"] == "kept" and stored["id"] == f"inbox-{entry.decode()}"
    await eventually(lambda: pending(redis) == 0, what="the entry to be acknowledged")


@aiotest
async def test_what_a_reader_without_heartbeat_left_comes_first_and_the_reader_goes(
        redis, messenger):
    """A dead reader's entries are handled at start, in order, before any
    newer entry, with no claim timeout to wait for."""
    redis.command("XGROUP", "CREATE", "rm:inbox", "redmessenger", "0", "MKSTREAM")
    for i in range(150):
        redis.command("XADD", "rm:inbox", "*", "to", "users.user1", "payload", str(i))
    redis.command("XREADGROUP", "GROUP", "redmessenger", "dead", "COUNT", "120", "STREAMS",
                  "rm:inbox", ">")
    assert pending(redis) == 120
    rm = await messenger(inbox=True, inbox_claim_after=3600)
    await eventually(lambda: len(rm.queue("user1")) == 150, what="all entries stored")
    assert [e["payload"] for e in rm.queue("user1")] == [str(i) for i in range(150)]
    await eventually(lambda: pending(redis) == 0, what="the entries to be acknowledged")
    consumers = [dict(zip(c[::2], c[1::2], strict=True))[b"name"]
                 for c in redis.command("XINFO", "CONSUMERS", "rm:inbox", "redmessenger")]
    assert b"dead" not in consumers and len(consumers) == 1


@aiotest
async def test_a_malformed_entry_is_logged_and_does_not_stop_the_others(redis, messenger):
    redis.command("XADD", "rm:inbox", "*", "to", "nowhere", "payload", "lost")
    redis.command("XADD", "rm:inbox", "*", "payload", "no recipient")
    redis.command("XADD", "rm:inbox", "*", "to", "users.user1", "payload", "fine")
    rm = await messenger(inbox=True)
    await eventually(lambda: [e["payload"] for e in rm.queue("user1")] == ["fine"])
    await eventually(lambda: pending(redis) == 0)


@aiotest
async def test_the_inbox_survives_a_redis_restart(private_redis):
    from harness import start_service

    rm = await start_service(private_redis, inbox=True)
    try:
        private_redis.stop()
        await eventually(lambda: not rm.service.redis.connected)
        private_redis.start()
        await tw(rm.service.redis.whenConnected())
        private_redis.command("XADD", "rm:inbox", "*", "to", "users.user1", "payload", "after")
        await eventually(lambda: rm.queue("user1"), what="an entry added after the restart")
    finally:
        await rm.stop()


@aiotest
async def test_entries_are_acknowledged_only_once_their_messages_are_in_redis(redis,
                                                                              messenger):
    """Messages held back in memory (behind a full ack window) must not let
    the inbox acknowledge their entries: a kill would lose them."""
    rm = await messenger(inbox=True, ack_window=2)
    client = await rm.user("user1", ack=True)  # and never acknowledges
    def add(numbers: range) -> bytes:  # at once: read in one batch
        replies = redis.client().pipeline(
            [("MULTI",)] + [("XADD", "rm:inbox", "*", "to", "users.user1", "payload", str(i))
                            for i in numbers] + [("EXEC",)])
        return replies[-1][-1]

    add(range(10))
    await client.messages(2)  # the window is full: the rest is claimed, and waits
    last = add(range(10, 15))  # while the drain waits for an ack

    def acknowledged() -> bool:
        [group] = redis.command("XINFO", "GROUPS", "rm:inbox", decode=True)
        info = dict(zip(group[::2], group[1::2], strict=True))
        return info["last-delivered-id"] == last.decode() and info["pending"] == 0

    def in_redis() -> int:
        claims = redis.command("KEYS", "rm:users:user1:taking:*")
        return len(rm.queue("user1")) + sum(redis.command("LLEN", k) for k in claims)

    await eventually(acknowledged, what="the entries to be acknowledged")
    assert in_redis() == 15


@pytest.mark.alone
@aiotest
async def test_entries_a_lost_read_left_pending_come_first_once_the_reader_is_back(redis,
                                                                                  messenger):
    """A read whose reply was lost with the connection leaves its entries
    pending for this very reader: they are handled as soon as it is back,
    before newer ones, not ``--inbox-claim-after`` (30 s) later."""
    rm = await messenger(inbox=True)
    user1 = await rm.user("user1")
    reader = rm.service.owner
    # Read for it, as if the reply to its own read had been lost.
    redis.client().pipeline([
        ("MULTI",),
        ("XADD", "rm:inbox", "*", "to", "users.user1", "payload", "older"),
        ("XREADGROUP", "GROUP", "redmessenger", reader, "COUNT", 10, "STREAMS", "rm:inbox",
         ">"),
        ("EXEC",)])
    kill_connection(redis, "inbox")
    redis.command("XADD", "rm:inbox", "*", "to", "users.user1", "payload", "newer")
    older, newer = await user1.messages(2)
    assert (older["payload"], newer["payload"]) == ("older", "newer")
    await eventually(lambda: pending(redis) == 0, what="both to be acknowledged")
