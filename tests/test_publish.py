"""Durable publish from an application's own code (redis-py): heard by a
running RedMessenger, or stored when none is running, and drained later."""

from __future__ import annotations

import pytest
import redis as redis_py
from harness import aiotest, eventually

from redmessenger.publish import durable_publish


@pytest.fixture
def app_redis(redis):
    client = redis_py.Redis(host="127.0.0.1", port=redis.port)
    yield client
    client.close()


def queue(redis, uid: str) -> list[bytes]:
    return redis.command("LRANGE", f"rm:users:{uid}:messages", 0, -1)


def test_with_no_redmessenger_the_message_is_stored_for_the_user(redis, app_redis):
    result = durable_publish(app_redis, "Hello, world!", user="user1")
    assert (result.subscribers, result.stored) == (0, 1)
    [stored] = queue(redis, "user1")
    assert f'"id":"{result.id}"'.encode() in stored and b'"source":"rm.users.user1"' in stored


def test_with_no_redmessenger_a_group_message_is_stored_for_each_member(redis, app_redis):
    redis.command("RPUSH", "rm:groups:cats:members", "a", "b", "a")
    assert durable_publish(app_redis, b"Meow!", group="cats").stored == 2
    assert len(queue(redis, "a")) == len(queue(redis, "b")) == 1
    redis.command("SADD", "rm:groups:dogs:members", "c")
    assert durable_publish(app_redis, b"Woof", group="dogs", queue_max=1).stored == 1
    assert durable_publish(app_redis, b"Woof 2", group="dogs", queue_max=1).stored == 1
    assert [b"Woof 2" in e for e in queue(redis, "c")] == [True]  # --queue-max 1 kept


def test_a_group_whose_members_key_is_not_a_list_or_a_set_is_an_error(redis, app_redis):
    """As RedMessenger itself reads the members (one Lua function): not an
    empty group that silently stores nothing."""
    redis.command("SET", "rm:groups:bad:members", "oops")
    with pytest.raises(redis_py.ResponseError,
                       match="rm:groups:bad:members is a string, not a list or a set"):
        durable_publish(app_redis, b"x", group="bad")
    redis.command("SET", "rm:users:user1:messages", "oops")
    with pytest.raises(redis_py.ResponseError, match="WRONGTYPE"):
        durable_publish(app_redis, b"x", user="user1")


def test_exactly_one_recipient_kind():
    with pytest.raises(ValueError):
        durable_publish(None, "x")
    with pytest.raises(ValueError):
        durable_publish(None, "x", user="a", group="b")


@aiotest
async def test_stored_while_down_then_drained_and_heard_while_up(redis, app_redis, messenger):
    offline = durable_publish(app_redis, "sent while no RedMessenger ran", user="user1")
    rm = await messenger()
    user1 = await rm.user("user1")
    [drained] = await user1.messages(1)
    assert drained["id"] == offline.id and drained["queued"] is True
    live = durable_publish(app_redis, "sent while it runs", user="user1")
    assert (live.subscribers, live.stored) == (1, 0)
    [message] = await user1.messages(1)
    assert message["payload"] == "sent while it runs" and message["queued"] is False
    # heard by RedMessenger for an offline user: RedMessenger stores it itself
    assert durable_publish(app_redis, "for someone away", user="away").stored == 0
    await eventually(lambda: queue(redis, "away"))
