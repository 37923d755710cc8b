"""The load generator: PUBLISHes over one raw socket, pipelined, replies
parsed by hiredis.

Message ``seq`` (0 to n-1) goes to ``targets[seq % len(targets)]`` with the
payload of :func:`bench.wire.payload`. With no ``rate``, every command is
built before the clock starts and sent as fast as Redis takes it (the
payload stamps are 0). With a ``rate``, each message is built and stamped
with ``time.monotonic_ns()`` when it is due, and sent at once.

Commands (JSON lines on stdin): first connect (and, with no rate, build
every command), so that the measured process's clock starts with the first
PUBLISH, then go::

    {"cmd": "prepare", "port": P, "targets": [...], "n": N, "payload_size": 64,
     "rate": 0, "timeout": 60}                      -> {"event": "prepared"}
    {"cmd": "go"}                                   -> {"event": "published", ...}

Each reply of PUBLISH is the number of subscribers that got the message;
``zero`` counts the messages nobody heard.
"""

from __future__ import annotations

import json
import resource
import socket
import sys
import time

import hiredis

from .wire import emit, payload

HOST = "127.0.0.1"
#: Commands per write when publishing as fast as possible.
BATCH = 1000


def publish_command(channel: bytes, data: bytes) -> bytes:
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel), channel, len(data), data)


class Publisher:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()
        self.replies = 0
        self.zero = 0
        self.errors: list[str] = []

    def _take_replies(self, block: bool) -> None:
        try:
            data = self.sock.recv(1 << 20, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if not data:
            raise ConnectionError("Redis closed the publisher's connection")
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            self.replies += 1
            if isinstance(reply, hiredis.ReplyError):
                if len(self.errors) < 5:
                    self.errors.append(str(reply))
            elif reply == 0:
                self.zero += 1

    def _finish(self, n: int, deadline: float) -> None:
        while self.replies < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.replies} of {n} PUBLISH replies in time")
            self._take_replies(block=True)

    def prepare(self, targets: list[bytes], n: int, size: int) -> list[bytes]:
        count = len(targets)
        return [b"".join(publish_command(targets[seq % count], payload(seq, 0, size))
                         for seq in range(first, min(n, first + BATCH)))
                for first in range(0, n, BATCH)]

    def blast(self, batches: list[bytes], n: int, deadline: float) -> tuple:
        t_start = time.monotonic()
        for batch in batches:
            self.sock.sendall(batch)
            self._take_replies(block=False)
        t_sent = time.monotonic()
        self._finish(n, deadline)
        return t_start, t_sent

    def paced(self, targets: list[bytes], n: int, size: int, rate: float,
              deadline: float) -> tuple:
        count = len(targets)
        seq = 0
        t_start = time.monotonic()
        while seq < n:
            due = min(n, int((time.monotonic() - t_start) * rate) + 1)
            if due > seq:
                stamp = time.monotonic_ns()
                self.sock.sendall(b"".join(
                    publish_command(targets[s % count], payload(s, stamp, size))
                    for s in range(seq, due)))
                seq = due
                self._take_replies(block=False)
            if time.monotonic() > deadline:
                raise TimeoutError(f"published only {seq} of {n} in time")
            pause = t_start + seq / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        t_sent = time.monotonic()
        self._finish(n, deadline)
        return t_start, t_sent


def run(prepare: dict) -> dict:
    """Publish as ``prepare`` says, once ``go`` comes."""
    publisher = Publisher(prepare["port"])
    targets = [t.encode() for t in prepare["targets"]]
    n, size, rate = prepare["n"], prepare["payload_size"], prepare.get("rate") or 0
    batches = None if rate else publisher.prepare(targets, n, size)
    emit({"event": "prepared"})
    line = sys.stdin.readline()
    if not line or json.loads(line).get("cmd") != "go":
        raise ValueError("expected go")
    deadline = time.monotonic() + prepare.get("timeout", 60)
    if rate:
        t_start, t_sent = publisher.paced(targets, n, size, rate, deadline)
    else:
        t_start, t_sent = publisher.blast(batches, n, deadline)
    t_end = time.monotonic()
    publisher.sock.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"event": "published", "n": n, "t_start": t_start, "t_sent": t_sent,
            "t_end": t_end, "replies": publisher.replies, "zero": publisher.zero,
            "errors": publisher.errors, "cpu": usage.ru_utime + usage.ru_stime}


def main() -> None:
    while line := sys.stdin.readline():
        command = json.loads(line)
        try:
            if command["cmd"] != "prepare":
                raise ValueError(f"unknown command {command['cmd']!r}")
            emit(run(command))
        except Exception as e:
            emit({"event": "error", "error": repr(e)})


if __name__ == "__main__":
    main()
