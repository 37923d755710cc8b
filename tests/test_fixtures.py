"""The suite's own redis-server fixtures and RESP helper, which other tests
trust for their assertions."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resp import RedisReplyError, encode_command, read_reply


def reply(data: bytes):
    return read_reply(io.BytesIO(data))


def test_reads_every_kind_of_reply() -> None:
    assert reply(b"+OK\r\n") == "OK"
    assert reply(b":-42\r\n") == -42
    assert reply(b"$5\r\nhe\r\nl\r\n") == b"he\r\nl"
    assert reply(b"$-1\r\n") is None
    assert reply(b"*-1\r\n") is None
    assert reply(b"*0\r\n") == []
    nested = reply(b"*3\r\n:1\r\n*2\r\n$1\r\na\r\n-ERR inner\r\n$0\r\n\r\n")
    assert nested[0] == 1
    assert nested[1][0] == b"a"
    assert isinstance(nested[1][1], RedisReplyError)
    assert nested[2] == b""


def test_a_truncated_reply_is_an_error() -> None:
    with pytest.raises(ConnectionError):
        reply(b"$5\r\nab")
    with pytest.raises(ConnectionError):
        reply(b"")


def test_encodes_commands() -> None:
    assert encode_command("LRANGE", b"k", 0, -1) == (
        b"*4\r\n$6\r\nLRANGE\r\n$1\r\nk\r\n$1\r\n0\r\n$2\r\n-1\r\n")


def test_error_replies_raise(redis) -> None:
    with pytest.raises(RedisReplyError, match="unknown command"):
        redis.command("NO-SUCH-COMMAND")


def test_where_the_shared_server_is(redis) -> None:
    assert redis.port != 6379
    assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
    assert redis.address.port == redis.port
    assert redis.address.host == "127.0.0.1"
    assert redis.command("DBSIZE") == 0


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.binary(), min_size=1, max_size=5))
def test_lists_round_trip(redis, values: list[bytes]) -> None:
    redis.command("DEL", "list")
    assert redis.command("RPUSH", "list", *values) == len(values)
    assert redis.command("LRANGE", "list", 0, -1) == values
    assert redis.command("LLEN", "list") == len(values)


def test_the_shared_server_comes_back_for_the_next_test(redis_server) -> None:
    redis_server.command("SET", "left", "behind")
    redis_server.stop()
    assert not redis_server.running


def test_it_came_back_empty(redis) -> None:
    """Relies on running after the test above, as pytest does by default."""
    assert redis.running
    assert redis.command("GET", "left") is None


def test_private_server_keeps_its_data_and_port_across_restarts(private_redis) -> None:
    port, pid = private_redis.port, private_redis.pid
    private_redis.command("RPUSH", "rm:users:1:queue", "kept")
    private_redis.stop()
    assert not private_redis.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(OSError):
        private_redis.command("PING")
    private_redis.start()
    assert private_redis.port == port
    assert private_redis.pid != pid
    assert private_redis.command("LRANGE", "rm:users:1:queue", 0, -1) == [b"kept"]


def test_private_server_can_be_killed(private_redis) -> None:
    pid = private_redis.pid
    private_redis.stop(kill=True)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    private_redis.start()
    assert private_redis.command("PING") == "PONG"


def test_private_server_is_not_the_shared_one(private_redis, redis) -> None:
    assert private_redis.port != redis.port
    private_redis.command("SET", "mine", "1")
    assert redis.command("GET", "mine") is None
