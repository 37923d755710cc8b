"""A small blocking Redis client (RESP over a socket, parsed by hiredis) for
the coordinator: filling queues, polling and checking them afterwards."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence

import hiredis

HOST = "127.0.0.1"


def encode(*args: bytes | str | int) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class RedisError(Exception):
    """Redis answered a command with an error."""


class Redis:
    """One connection; every call waits at most ``timeout`` seconds per read."""

    def __init__(self, port: int, host: str = HOST, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Redis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _replies(self, count: int) -> list:
        replies = []
        while len(replies) < count:
            reply = self.reader.gets()
            if reply is False:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                self.reader.feed(data)
                continue
            replies.append(reply)
        return replies

    def pipeline(self, commands: Iterable[Sequence[bytes | str | int]]) -> list:
        """Send every command, then read every reply (errors raise)."""
        commands = list(commands)
        self.sock.sendall(b"".join(encode(*command) for command in commands))
        replies = self._replies(len(commands))
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise RedisError(str(reply))
        return replies

    def command(self, *args: bytes | str | int):
        return self.pipeline([args])[0]
