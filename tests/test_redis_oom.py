"""Redis out of memory (``maxmemory`` reached under ``noeviction``): writes
are held and retried in order, /health says 503, and nothing is lost; and
the memory held for them is bounded (``--max-pending-bytes``)."""

from __future__ import annotations

import json

import pytest

from harness import aiotest, eventually, get, http_url, metric, start_service


@pytest.mark.parametrize(("reply", "passes"), [
    ("OOM command not allowed when used memory > 'maxmemory'.", True),
    ("OOM command not allowed when used memory > 'maxmemory'. script: 9c25, on "
     "@user_script:2.", True),  # Redis 7, from a script's redis.call
    ("ERR Error running script (call to f_9c25): @user_script:2: @user_script: 2: -OOM "
     "command not allowed when used memory > 'maxmemory'.", True),  # Redis 6.2
    ("@user_script: 1: -OOM command not allowed", True),  # 6.2, a pcall's error returned
    ("LOADING Redis is loading the dataset in memory", True),
    ("READONLY You can't write against a read only replica.", True),
    ("BUSY Redis is busy running a script.", True),
    ("MASTERDOWN Link with MASTER is down", True),
    ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable", True),
    ("BUSYGROUP Consumer Group name already exists", False),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
    ("ERR Protocol error: invalid bulk length", False),
    ("ERR value is not an integer or out of range (OOM)", False),
])
def test_which_error_replies_are_worth_retrying(reply, passes):
    from redmessenger.redisconnection import transient

    assert transient(reply) is passes


def payloads(server, uid: str) -> list[str]:
    return [json.loads(raw)["payload"]
            for raw in server.command("LRANGE", f"rm:users:{uid}:messages", 0, -1)]


@aiotest
async def test_stores_refused_for_lack_of_memory_are_kept_in_order_until_redis_takes_them(
        oom_redis, logged):
    rm = await start_service(oom_redis)
    try:
        for i in range(20):
            rm.publish("rm.users.u", str(i))
        await eventually(lambda: len(payloads(oom_redis, "u")) == 20)
        oom_redis.out_of_memory(True)
        for i in range(20, 40):
            rm.publish("rm.users.u", str(i))
            rm.publish("rm.users.v", str(i))
        await eventually(lambda: not rm.service.redis.writable, what="a refusal")
        assert [x for x in logged if "refuses commands for now" in x and "OOM" in x]
        status, _, body = await get(http_url(rm, "/health"))
        assert status == 503 and json.loads(body)["redis"]["writable"] is False
        assert metric((await get(http_url(rm, "/metrics")))[2].decode(),
                      "redmessenger_redis_writable") == 0
        assert len(payloads(oom_redis, "u")) == 20 and payloads(oom_redis, "v") == []
        oom_redis.out_of_memory(False)
        for i in range(40, 60):  # sent while the held ones go again: after them
            rm.publish("rm.users.u", str(i))
            rm.publish("rm.users.v", str(i))
        await eventually(lambda: len(payloads(oom_redis, "u")) == 60
                         and len(payloads(oom_redis, "v")) == 40, what="every message stored")
        assert payloads(oom_redis, "u") == [str(i) for i in range(60)]
        assert payloads(oom_redis, "v") == [str(i) for i in range(20, 60)]
        await eventually(lambda: rm.service.redis.writable)
        assert (await get(http_url(rm, "/health")))[0] == 200
        assert not [x for x in logged if "Could not store" in x]
        assert rm.dispatcher.stats.stored == 100 and rm.dispatcher.stats.dead_letters == 0
    finally:
        await rm.stop()


@aiotest
async def test_a_recommit_refused_for_lack_of_memory_is_retried_until_it_is_in_the_queue(
        oom_redis):
    from redmessenger.envelope import Envelope

    rm = await start_service(oom_redis)
    try:
        oom_redis.out_of_memory(True)
        envelopes = [Envelope(f"id-{i}", "rm.users.u", 0, str(i).encode()) for i in range(5)]
        requeued = rm.service.store.requeue("u", envelopes)
        await eventually(lambda: not rm.service.redis.writable)
        assert not requeued.called
        oom_redis.out_of_memory(False)
        await eventually(lambda: requeued.called)
        assert payloads(oom_redis, "u") == [str(i) for i in range(5)]
    finally:
        await rm.stop()


@aiotest
async def test_past_max_pending_bytes_hellos_get_1013_and_the_subscriber_pauses(
        oom_redis, logged):
    rm = await start_service(oom_redis, max_pending_bytes=20_000)
    try:
        oom_redis.out_of_memory(True)
        for i in range(100):
            rm.publish("rm.users.u", f"{i:04d}" + "x" * 1000)
        await eventually(lambda: rm.service.subscriber.paused, what="the subscriber paused")
        assert rm.service.redis.overloaded
        text = (await get(http_url(rm, "/metrics")))[2].decode()
        assert metric(text, "redmessenger_redis_overloaded") == 1
        assert metric(text, "redmessenger_redis_pending_bytes") > 20_000
        client = await rm.connect()
        await client.send_json({"id": "someone"})
        error, code = await client.refused()
        assert code == 1013 and error["code"] == "redis_busy"
        assert len([x for x in logged if "over --max-pending-bytes" in x]) == 1
        oom_redis.out_of_memory(False)
        # Redis kept what was published meanwhile; every message is stored.
        await eventually(lambda: len(payloads(oom_redis, "u")) == 100, what="all stored")
        assert [p[:4] for p in payloads(oom_redis, "u")] == [f"{i:04d}" for i in range(100)]
        # Redis has the last store before its answer reaches the node, and
        # only that answer brings the node back under the bound.
        await eventually(lambda: not rm.service.subscriber.paused
                         and not rm.service.redis.overloaded, what="the subscriber reading")
        # What Redis kept may cross the bound again as it floods in: one
        # line per crossing, each way, never one per message.
        over = [x for x in logged if "over --max-pending-bytes" in x]
        assert len(over) == len([x for x in logged if "Redis caught up" in x]) < 10
        await rm.user("someone")
    finally:
        await rm.stop()


@aiotest
async def test_stores_a_read_only_replica_refuses_land_once_it_is_a_primary_again(
        private_redis, free_port, logged):
    rm = await start_service(private_redis)
    try:
        private_redis.command("REPLICAOF", "127.0.0.1", free_port)  # a primary never found
        for i in range(10):
            rm.publish("rm.users.u", str(i))
        await eventually(lambda: not rm.service.redis.writable, what="the refusal")
        assert "READONLY" in rm.service.redis.refusal
        assert payloads(private_redis, "u") == []
        private_redis.command("REPLICAOF", "NO", "ONE")
        await eventually(lambda: len(payloads(private_redis, "u")) == 10)
        assert payloads(private_redis, "u") == [str(i) for i in range(10)]
    finally:
        await rm.stop()


@aiotest
async def test_unacked_messages_of_a_client_gone_while_redis_is_out_of_memory_are_kept(
        oom_redis):
    """The drain claim is their only other copy: it goes only once the
    recommit is in the queue. (It used to be deleted right behind a recommit
    Redis refused, and nothing was left.)"""
    rm = await start_service(oom_redis)
    try:
        for i in range(5):
            rm.publish("rm.users.u", str(i))
        await eventually(lambda: len(payloads(oom_redis, "u")) == 5)
        client = await rm.user("u", ack=True)
        assert [m["payload"] for m in await client.messages(5)] == [str(i) for i in range(5)]
        [claim] = oom_redis.command("KEYS", "rm:users:u:taking:*")
        oom_redis.out_of_memory(True)
        await client.close()  # nothing acknowledged
        await eventually(lambda: not rm.service.redis.writable, what="the refused recommit")
        assert oom_redis.command("LLEN", claim) == 5  # still claimed: the only copy
        oom_redis.out_of_memory(False)
        await eventually(lambda: payloads(oom_redis, "u") == [str(i) for i in range(5)],
                         what="the recommit")
        await eventually(lambda: not oom_redis.command("KEYS", "rm:users:u:taking:*")
                         and not oom_redis.command("EXISTS", "rm:users:u:claims"),
                         what="the claim to go")
    finally:
        await rm.stop()


@aiotest
async def test_the_lease_is_renewed_while_redis_is_out_of_memory(oom_redis):
    """Held behind the refused writes, it would expire after 3 s: this node
    would count as dead, its claims would be taken back, and it would have
    to stop."""
    rm = await start_service(oom_redis)
    try:
        [key] = oom_redis.command("KEYS", "rm:procs:*")
        oom_redis.out_of_memory(True)
        rm.publish("rm.users.u", "refused for now")
        await eventually(lambda: not rm.service.redis.writable, what="a refusal")
        oom_redis.command("PEXPIRE", key, 1500)  # as if the spell had lasted 1.5 s
        await eventually(lambda: oom_redis.command("PTTL", key) > 1500, what="a renewal")
        assert not rm.service.redis.writable  # it went ahead of the held writes
        assert not rm.service.membership.is_lost
        oom_redis.out_of_memory(False)
        await eventually(lambda: payloads(oom_redis, "u") == ["refused for now"])
    finally:
        await rm.stop()
