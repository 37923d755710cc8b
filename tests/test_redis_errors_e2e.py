"""Redis saying no (a key of the wrong type, a flushed script cache): each
refusal is logged with what it concerned, and nobody else is affected."""

from __future__ import annotations

from harness import aiotest, eventually


def payloads(frames):
    return [f["payload"] for f in frames]


@aiotest
async def test_a_store_redis_refuses_is_logged_with_its_id_and_size_not_its_payload(
        messenger, logged):
    rm = await messenger()
    rm.redis.command("SET", "rm:users:broken:messages", "not a list")
    rm.publish("rm.users.broken", "cannot be stored" + "x" * 1000)
    line = await eventually(lambda: [x for x in logged if "Redis refused message" in x])
    assert "WRONGTYPE" in line[0] and "rm:dead" in line[0] and "bytes" in line[0]
    assert "cannot be stored" not in "".join(logged)
    rm.publish("rm.users.fine", "stored")
    await eventually(lambda: rm.queue("fine"))


@aiotest
async def test_a_group_whose_members_cannot_be_read_does_not_hold_up_others(messenger, logged):
    rm = await messenger()
    rm.redis.command("SET", "rm:groups:bad:members", "a string")
    user1 = await rm.user("user1")
    rm.publish("rm.groups.bad", "lost to a broken group")
    rm.publish("rm.users.user1", "after")
    assert payloads(await user1.messages(1)) == ["after"]
    line = await eventually(lambda: [x for x in logged if "members of group bad" in x])
    assert "WRONGTYPE" in line[0] and "bytes" in line[0]
    assert "lost to a broken group" not in "".join(logged)


@aiotest
async def test_a_group_with_no_members_is_logged(messenger, logged):
    rm = await messenger()
    rm.publish("rm.groups.empty", "nobody")
    await eventually(lambda: [x for x in logged if "has no members" in x])


@aiotest
async def test_a_queue_that_cannot_be_drained_still_lets_the_user_in(messenger, logged):
    rm = await messenger()
    rm.redis.command("SET", "rm:users:user1:messages", "not a list")
    user1 = await rm.user("user1")
    assert user1.welcome["queued"] == 0
    await eventually(lambda: [x for x in logged if "Could not drain" in x])
    rm.publish("rm.users.user1", "live")
    assert payloads(await user1.messages(1)) == ["live"]


@aiotest
async def test_a_key_that_cannot_be_read_refuses_the_hello_with_1013(messenger, logged):
    from redmessenger.settings import AuthMode

    rm = await messenger(auth=AuthMode.REQUIRED)
    rm.redis.command("RPUSH", "rm:users:user1:key", "a list, not a string")
    client = await rm.connect()
    await client.send_json({"id": "user1", "key": "k"})
    error, code = await client.refused()
    assert code == 1013 and error["code"] == "server_error"
    assert [x for x in logged if "Checking the hello" in x]


@aiotest
async def test_stores_go_on_after_the_script_cache_is_flushed(messenger, logged):
    rm = await messenger()
    rm.publish("rm.users.u", "before")
    await eventually(lambda: rm.queue("u"))
    rm.redis.command("SCRIPT", "FLUSH")
    rm.publish("rm.users.u", "after")
    await eventually(lambda: len(rm.queue("u")) == 2)
    assert [e["payload"] for e in rm.queue("u")] == ["before", "after"]
    assert [x for x in logged if "forgot a script" in x]


@aiotest
async def test_a_leave_redis_refuses_is_logged_once_and_loses_nothing(messenger, logged, redis):
    """The user's leaving sockets became something else than a set (another
    program wrote the key) while the user was connected: its leave is
    refused, logged once, and the user's later messages are still stored
    for it; other users are not affected."""
    rm = await messenger()
    client = await rm.user("user1")
    redis.command("SET", "rm:leaving:user1", "not a set")
    await client.close()
    await eventually(lambda: any("Could not record that socket" in line for line in logged),
                     what="the refused leave to be logged")
    rm.publish("rm.users.user1", "after")
    await eventually(lambda: [m["payload"] for m in rm.queue("user1")] == ["after"],
                     what="the message to be stored")
    other = await rm.user("user2")
    rm.publish("rm.users.user2", "live")
    assert [m["payload"] for m in await other.messages(1)] == ["live"]
    assert len([line for line in logged if "Could not record that socket" in line]) == 1
