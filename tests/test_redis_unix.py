"""``--redis unix:///path?db=N``: the same service over a Unix socket."""

from __future__ import annotations

import socket

import pytest

from harness import aiotest, eventually, start_service
from redisservers import spawned_redis
from resp import encode_command, read_reply


class UnixRedis:
    """A redis-server listening only on a Unix socket (port 0: no TCP)."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def command(self, *args):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(self.path)
            sock.sendall(encode_command(*args))
            with sock.makefile("rb") as stream:
                return read_reply(stream)


@pytest.fixture
def unix_redis(tmp_path):
    from redmessenger.redisserver import find_redis_server

    path = tmp_path / "redis.sock"
    redis = UnixRedis(path)
    with spawned_redis([find_redis_server(), "--port", "0", "--unixsocket", str(path),
                        "--dir", str(tmp_path), "--save", "", "--appendonly", "no"],
                       lambda: redis.command("PING")):
        yield redis


@aiotest
async def test_a_redis_on_a_unix_socket_and_another_database(unix_redis):
    from redmessenger.settings import RedisAddress

    class Target:
        address = RedisAddress.from_url(f"unix://{unix_redis.path}?db=3")

    rm = await start_service(Target())
    try:
        unix_redis.command("PUBLISH", "rm.users.user1", "over a unix socket")
        stored = await eventually(lambda: _in_db(unix_redis, 3, "LRANGE",
                                                 "rm:users:user1:messages", 0, -1))
        assert len(stored) == 1
        assert _in_db(unix_redis, 0, "EXISTS", "rm:users:user1:messages") == 0
        user1 = await rm.user("user1")
        [message] = await user1.messages(1)
        assert message["payload"] == "over a unix socket"
    finally:
        await rm.stop()


def _in_db(redis: UnixRedis, db: int, *args):
    """One command on database ``db`` (SELECT and the command on one connection)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(redis.path)
        sock.sendall(encode_command("SELECT", db) + encode_command(*args))
        with sock.makefile("rb") as stream:
            read_reply(stream)
            return read_reply(stream)
