"""Just enough of the Redis protocol (RESP2) for tests to make assertions
with (LRANGE, LLEN, RPUSH, ...): blocking, one connection per command, so
that it works outside the reactor and across Redis restarts. Not a Redis
client for anything else."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import IO, Any

from network import HOST


class RedisReplyError(Exception):
    """Redis answered with an error (``-ERR ...``)."""


def encode_command(*args: bytes | str | int | float) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, int | float):
            data = repr(arg).encode()
        else:
            raise TypeError(f"cannot send {arg!r} to Redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def read_reply(stream: IO[bytes]) -> Any:
    """Read one RESP2 reply: ``str`` for a status, ``int``, ``bytes`` or
    ``None`` for a bulk string, ``list`` (possibly nested) for an array, and
    a :class:`RedisReplyError` instance for an error (returned, not raised,
    so an error inside an array, as from EXEC, stays in its place)."""
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError(f"connection closed in a reply (got {line!r})")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RedisReplyError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = stream.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("connection closed in a bulk string")
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        if count < 0:
            return None
        return [read_reply(stream) for _ in range(count)]
    raise ValueError(f"not a RESP reply: {line!r}")


def decoded(reply: Any) -> Any:
    """A reply with its bulk strings as ``str``, in arrays too."""
    if isinstance(reply, bytes):
        return reply.decode()
    if isinstance(reply, list):
        return [decoded(item) for item in reply]
    return reply


class RespClient:
    """Sends one command per connection and returns its reply, so it needs
    no closing and never carries a half-read reply across a Redis restart."""

    def __init__(self, port: int, host: str = HOST, timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout

    def command(self, *args: bytes | str | int | float, decode: bool = False) -> Any:
        """Run one command; raise :class:`RedisReplyError` if Redis answers
        with an error. ``decode=True`` turns bulk strings into ``str``."""
        with socket.create_connection((self.host, self.port), timeout=self.timeout) as sock:
            sock.sendall(encode_command(*args))
            with sock.makefile("rb") as stream:
                reply = read_reply(stream)
        if isinstance(reply, RedisReplyError):
            raise reply
        return decoded(reply) if decode else reply

    def pipeline(self, commands: list[tuple]) -> list[Any]:
        """Send many commands at once and read all their replies (errors
        are returned in place, not raised)."""
        with socket.create_connection((self.host, self.port), timeout=self.timeout) as sock:
            sock.sendall(b"".join(encode_command(*args) for args in commands))
            with sock.makefile("rb") as stream:
                return [read_reply(stream) for _ in commands]


class EmbeddedRedisClient(RespClient):
    """A :class:`RespClient` for an embedded redis-server, which requires
    the password kept in its data directory: read at every command, since
    the server makes it at its first start."""

    def __init__(self, port: int, data_dir: Path) -> None:
        super().__init__(port)
        self.data_dir = data_dir

    def pipeline(self, commands: list[tuple]) -> list[Any]:
        password = (self.data_dir / "redis-password").read_text().strip()
        authorized, *replies = super().pipeline([("AUTH", password), *commands])
        if isinstance(authorized, RedisReplyError):
            raise authorized
        return replies

    def command(self, *args: bytes | str | int | float, decode: bool = False) -> Any:
        [reply] = self.pipeline([args])
        if isinstance(reply, RedisReplyError):
            raise reply
        return decoded(reply) if decode else reply
