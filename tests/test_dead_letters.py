"""Messages Redis refuses for good (a queue key of another type, a value
bigger than ``proto-max-bulk-len``) go to ``rm:dead``, are counted there and
not as stored, and ``redmessenger dead`` shows them, pushes them back and
drops them."""

from __future__ import annotations

import json

import pytest

from commandline import cli_async, ok, queue
from harness import aiotest, eventually, get, http_url, metric, start_service, tw


def dead(redis) -> list[dict]:
    return [json.loads(raw) for raw in redis.command("LRANGE", "rm:dead", 0, -1)]


def payload(letter: dict) -> str:
    return json.loads(letter["envelope"])["payload"]


@pytest.mark.alone
@aiotest
async def test_an_inbox_message_for_a_queue_of_another_type_is_dead_lettered_then_acked(
        messenger, redis, logged):
    rm = await messenger(inbox=True)
    redis.command("SET", "rm:users:broken:messages", "not a list")
    redis.command("XADD", "rm:inbox", "*", "to", "users.broken", "payload", "refused")
    redis.command("XADD", "rm:inbox", "*", "to", "users.fine", "payload", "stored")
    await eventually(lambda: dead(redis) and rm.queue("fine"))
    [letter] = dead(redis)
    assert letter["key"] == "rm:users:broken:messages" and "WRONGTYPE" in letter["error"]
    assert payload(letter) == "refused" and json.loads(letter["envelope"])["id"].startswith(
        "inbox-")
    await eventually(lambda: redis.command("XPENDING", "rm:inbox", "redmessenger")[0] == 0,
                     what="both entries acknowledged")
    text = (await get(http_url(rm, "/metrics")))[2].decode()
    assert metric(text, "redmessenger_dead_letters_total") == 1
    assert metric(text, "redmessenger_messages_stored_total") == 1
    assert not [x for x in logged if "refused" in x and "payload" in x]


@aiotest
async def test_a_recommit_refused_for_good_fires_once_dead_lettered_in_order(messenger, redis):
    from redmessenger.envelope import Envelope

    rm = await messenger()
    redis.command("SET", "rm:users:u:messages", "not a list")
    envelopes = [Envelope(f"id-{i}", "rm.users.u", 0, str(i).encode()) for i in range(5)]
    await tw(rm.service.store.requeue("u", envelopes))
    assert [payload(d) for d in dead(redis)] == [str(i) for i in range(5)]
    assert rm.dispatcher.stats.dead_letters == 5


@aiotest
async def test_a_value_over_proto_max_bulk_len_is_dead_lettered_and_others_go_on(
        private_redis, logged):
    # The smallest limit Redis takes is 1 MB; the message is 1.5 MB, kept in
    # rm:dead in parts, and pushed back once Redis takes values that big.
    private_redis.command("CONFIG", "SET", "proto-max-bulk-len", 1024 * 1024)
    rm = await start_service(private_redis)
    try:
        rm.publish("rm.users.u", "before")
        await eventually(lambda: rm.queue("u"))
        rm.service.store.store(["u"], _big_envelope())
        rm.publish("rm.users.u", "after")
        await eventually(lambda: len(rm.queue("u")) == 2, what="the next store")
        assert [e["payload"] for e in rm.queue("u")] == ["before", "after"]
        await tw(rm.service.store.flushed())
        [letter] = dead(private_redis)
        assert "bulk length" in letter["error"] and "envelope" not in letter
        assert private_redis.command("LLEN", letter["parts"]) == 7  # 256 KiB each
        assert not [x for x in logged if "x" * 500 in x]
        assert rm.dispatcher.stats.dead_letters == 1

        out = ok(await cli_async(private_redis.url, "dead", "list"))
        assert "id-big" in out and f"... ({1536 * 1024} bytes)" in out and len(out) < 1000
        private_redis.command("CONFIG", "SET", "proto-max-bulk-len", 4 * 1024 * 1024)
        ok(await cli_async(private_redis.url, "dead", "retry", "id-big"))
        assert [e["id"] for e in rm.queue("u")][-1] == "id-big"
        assert rm.queue("u")[-1]["payload"] == "x" * (1536 * 1024)
        assert dead(private_redis) == [] and not private_redis.command("EXISTS", letter["parts"])
    finally:
        await rm.stop()


def _big_envelope():
    from redmessenger.envelope import Envelope

    return Envelope("id-big", "rm.users.u", 0, b"x" * (1536 * 1024))


@aiotest
async def test_dead_letters_are_bounded_by_dead_max_oldest_dropped_with_a_count(
        messenger, redis):
    rm = await messenger(dead_max=3)
    redis.command("SET", "rm:users:broken:messages", "not a list")
    big = {0, 1, 4}  # kept in parts
    for i in range(5):
        rm.publish("rm.users.broken", str(i) * (300_000 if i in big else 1))
    await eventually(lambda: redis.command("GET", "rm:dead:dropped") == b"2")
    assert [d.get("parts") is None for d in dead(redis)] == [True, True, False]
    assert [payload(d) for d in dead(redis)[:2]] == ["2", "3"]
    # The parts of those dropped went with them.
    assert redis.command("KEYS", "rm:dead:parts:*") == [dead(redis)[2]["parts"].encode()]


@aiotest
async def test_redmessenger_dead_lists_retries_and_drops(messenger, redis):
    rm = await messenger()
    redis.command("SET", "rm:users:a:messages", "not a list")
    redis.command("SET", "rm:users:b:messages", "not a list")
    for uid in ("a", "b", "a"):
        rm.publish(f"rm.users.{uid}", f"to {uid}")
    await eventually(lambda: len(dead(redis)) == 3)
    ids = [json.loads(d["envelope"])["id"] for d in dead(redis)]

    out = ok(await cli_async(redis.url, "dead", "list"))
    assert out.startswith("rm:dead: 3 dead letters:")
    assert all(i in out for i in ids) and '"to a"' in out and "WRONGTYPE" in out
    lines = ok(await cli_async(redis.url, "dead", "list", "--json")).splitlines()
    assert [json.loads(line) for line in lines] == dead(redis)

    redis.command("DEL", "rm:users:a:messages")  # a is fixed, b is not
    result = await cli_async(redis.url, "dead", "retry")
    assert result.returncode == 1 and "still refused" in result.stderr
    assert [e["payload"] for e in queue(redis, "a")] == ["to a", "to a"]
    assert [e["id"] for e in queue(redis, "a")] == [ids[0], ids[2]]
    assert [payload(d) for d in dead(redis)] == ["to b"]

    result = await cli_async(redis.url, "dead", "drop")
    assert result.returncode == 1 and "--all" in result.stderr
    ok(await cli_async(redis.url, "dead", "drop", ids[1]))
    assert dead(redis) == []
    assert "0 dead letters" in ok(await cli_async(redis.url, "dead", "list"))
