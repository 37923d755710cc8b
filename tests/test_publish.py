"""Durable publish from an application's own code (redis-py): heard by a
running RedMessenger, or stored when none is running, and drained later."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import redis as redis_py
import redis.asyncio as redis_asyncio

from redmessenger.envelope import MessageIds
from redmessenger.publish import Published, durable_publish

from harness import aiotest, eventually


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


def test_a_group_message_is_stored_for_every_member_or_for_none(redis, app_redis):
    """The third member's queue is not a list: before, the first two kept a
    copy and a retry gave them another one under a new id."""
    redis.command("RPUSH", "rm:groups:cats:members", "a", "b", "c", "d")
    redis.command("RPUSH", "rm:users:a:messages", "older")
    redis.command("SET", "rm:users:c:messages", "not a list")
    with pytest.raises(redis_py.ResponseError,
                       match="rm:users:c:messages is a string, not a list"):
        durable_publish(app_redis, b"Meow!", group="cats")
    assert queue(redis, "a") == [b"older"]
    assert queue(redis, "b") == queue(redis, "d") == []
    assert redis.command("GET", "rm:users:c:messages") == b"not a list"

    redis.command("DEL", "rm:users:c:messages")  # repaired: the retry stores one copy each
    assert durable_publish(app_redis, b"Meow!", group="cats").stored == 4
    assert [len(queue(redis, uid)) for uid in "abcd"] == [2, 1, 1, 1]


def test_exactly_one_recipient_kind():
    with pytest.raises(ValueError):
        durable_publish(None, "x")
    with pytest.raises(ValueError):
        durable_publish(None, "x", user="a", group="b")


@pytest.mark.parametrize("kind", ["user", "group"])
@pytest.mark.parametrize("name", ["", "two words", "tab\there", "x" * 257, "bell\a", 7])
def test_an_id_nobody_can_have_is_refused_before_redis_is_asked(kind, name):
    """``rm.groups.`` alone is a channel RedMessenger ignores: the PUBLISH
    would reach nobody while saying it reached a subscriber."""
    with pytest.raises(ValueError, match=f"a {kind} id is 1 to 256 printable characters"):
        durable_publish(None, "x", **{kind: name})


def wait_for_child(pid: int, timeout: float = 30.0) -> int:
    """Its exit code; killed (and failing the test) if it hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish within {timeout} s")


def test_forked_workers_give_out_ids_of_their_own(redis, app_redis):
    """As gunicorn --preload or celery prefork workers: the module (and its
    id generator) was imported, and used, before the fork."""
    first = durable_publish(app_redis, "from the parent", user="user1").id
    children = []
    for worker in range(2):
        pid = os.fork()
        if pid == 0:  # the child: publish with its own connection, never return to pytest
            status = 1
            try:
                with redis_py.Redis(host="127.0.0.1", port=redis.port) as own:
                    for i in range(5):
                        durable_publish(own, f"worker {worker} message {i}", user="user1")
                status = 0
            finally:
                os._exit(status)
        children.append(pid)
    for pid in children:
        assert wait_for_child(pid) == 0
    ids = [json.loads(raw)["id"] for raw in queue(redis, "user1")]
    assert len(ids) == 11 and ids[0] == first
    assert len(set(ids)) == 11, sorted(ids)


def test_every_id_generator_is_reseeded_in_a_forked_child():
    """The server's (each Delivery has one) as well as durable_publish()'s."""
    ids = MessageIds()
    ids()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_end, ids().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    assert wait_for_child(pid) == 0
    with os.fdopen(read_end, "rb") as pipe:
        in_the_child = pipe.read().decode()
    in_the_parent = ids()
    assert in_the_parent.endswith("-2") and in_the_child.endswith("-1")
    assert in_the_child.split("-")[0] != in_the_parent.split("-")[0]


@aiotest
async def test_an_asyncio_redis_client_is_awaited(redis):
    app = redis_asyncio.Redis(host="127.0.0.1", port=redis.port)
    try:
        result = await durable_publish(app, "from asyncio", user="user1")
        assert isinstance(result, Published) and (result.subscribers, result.stored) == (0, 1)
        [stored] = queue(redis, "user1")
        assert json.loads(stored)["id"] == result.id
        redis.command("SET", "rm:users:user2:messages", "oops")
        with pytest.raises(redis_py.ResponseError, match="rm:users:user2:messages"):
            await durable_publish(app, "x", user="user2")
    finally:
        await app.aclose()


@aiotest
async def test_stored_while_down_then_drained_and_woken_for_while_up(redis, app_redis,
                                                                      messenger):
    offline = durable_publish(app_redis, "sent while no RedMessenger ran", user="user1")
    rm = await messenger()
    user1 = await rm.user("user1")
    [drained] = await user1.messages(1)
    assert drained["id"] == offline.id and drained["queued"] is True
    # Stored all the same, and the node holding user1 woken: it drains it.
    online = durable_publish(app_redis, "sent while it runs", user="user1")
    # The wake is heard by the node holding user1 (and by the storer).
    assert (online.subscribers, online.stored) == (2 if rm.beside_a_storer else 1, 1)
    [message] = await user1.messages(1)
    assert (message["payload"], message["id"]) == ("sent while it runs", online.id)
    await eventually(lambda: not queue(redis, "user1"), what="the drain")
    # For a user who is away: stored once, by the script alone.
    assert (durable_publish(app_redis, "for someone away", user="away").stored,
            len(queue(redis, "away"))) == (1, 1)
