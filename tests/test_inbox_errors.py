"""The inbox reader survives every error reply: a stream or group that is
gone is made again, other refusals (out of memory) are retried with
backoff, and /health says 503 while it cannot read."""

from __future__ import annotations

import json

from harness import aiotest, eventually, get, http_url, start_service, tw


def blocked_reader(redis) -> bool:
    """Whether the inbox' connection is blocked in XREADGROUP."""
    clients = redis.command("CLIENT", "LIST").decode()
    return any("name=redmessenger:inbox" in line and "cmd=xreadgroup" in line
               for line in clients.splitlines())


def oom_errors(redis) -> int:
    """How many OOM error replies Redis has given."""
    for line in redis.command("INFO", "errorstats").decode().splitlines():
        if line.startswith("errorstat_OOM:"):
            return int(line.split("count=")[1])
    return 0


@aiotest
async def test_an_inbox_that_cannot_make_its_group_for_lack_of_memory_reads_once_it_can(
        oom_redis):
    from twisted.internet import reactor

    from redmessenger.inbox import Inbox
    from redmessenger.keys import Namespace

    rm = await start_service(oom_redis)
    inbox = Inbox(oom_redis.address, Namespace(), rm.service.store,
                  "reader", reactor)
    try:
        oom_redis.out_of_memory(True)
        refused = oom_errors(oom_redis)
        inbox.startService()  # XGROUP CREATE ... MKSTREAM: OOM
        await eventually(lambda: oom_errors(oom_redis) > refused + 1, what="refusals")
        oom_redis.out_of_memory(False)
        oom_redis.command("XADD", "rm:inbox", "*", "to", "users.u", "payload", "read")
        await eventually(lambda: rm.queue("u"), what="the entry to be read")
        assert inbox.reading
    finally:
        await tw(inbox.stopService())
        await rm.stop()


@aiotest
async def test_an_inbox_deleted_while_the_reader_is_blocked_is_made_again(redis, messenger):
    rm = await messenger(inbox=True)
    redis.command("XADD", "rm:inbox", "*", "to", "users.u", "payload", "first")
    await eventually(lambda: rm.queue("u"))
    await eventually(lambda: blocked_reader(redis), what="the reader to block")
    redis.command("DEL", "rm:inbox")  # Redis 7 unblocks the read with an error; 6.2 does not
    redis.command("XADD", "rm:inbox", "*", "to", "users.u", "payload", "second")
    await eventually(lambda: len(rm.queue("u")) == 2, what="the new entry to be read")
    assert [e["payload"] for e in rm.queue("u")] == ["first", "second"]


@aiotest
async def test_health_is_503_while_the_inbox_cannot_read(oom_redis):
    rm = await start_service(oom_redis, inbox=True)
    try:
        await eventually(lambda: blocked_reader(oom_redis), what="the reader to block")
        assert json.loads((await get(http_url(rm, "/health")))[2])["inbox"] == {
            "reading": True, "error": None}
        oom_redis.out_of_memory(True)
        oom_redis.command("DEL", "rm:inbox")  # and making it again needs memory
        await eventually(lambda: not rm.service.inbox.reading, what="the refusal")
        status, _, body = await get(http_url(rm, "/health"))
        assert status == 503 and "OOM" in json.loads(body)["inbox"]["error"]
        oom_redis.out_of_memory(False)
        await eventually(lambda: rm.service.inbox.reading and rm.service.redis.writable)
        oom_redis.command("XADD", "rm:inbox", "*", "to", "users.u", "payload", "read")
        await eventually(lambda: rm.queue("u"), what="the entry to be read")
        assert (await get(http_url(rm, "/health")))[0] == 200
    finally:
        await rm.stop()


@aiotest
async def test_a_malformed_entry_is_logged_without_its_payload(redis, messenger, logged):
    entry = redis.command("XADD", "rm:inbox", "*", "to", "nowhere", "payload", "p" * 100_000)
    redis.command("XADD", "rm:inbox", "*", "to", "users.u", "payload", "fine")
    rm = await messenger(inbox=True)
    await eventually(lambda: rm.queue("u"))
    [line] = [x for x in logged if entry.decode() in x and "dropping" in x]
    assert "100000" in line and len(line) < 500
