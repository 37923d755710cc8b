"""Baseline: the raw Autobahn send rate, with no Redis and no RedMessenger.

A bare Autobahn WebSocket server on Twisted's default reactor (as twistd
uses): it welcomes each hello as RedMessenger does, and on ``send`` sends
``n`` message frames, round-robin over the users, shaped and sized exactly
like RedMessenger's live message frames, as fast as it can: ``chunk``
frames per reactor turn, as RedMessenger sends what one read from Redis
brought.

Commands (JSON lines on stdin)::

    {"cmd": "listen", "port": P}                         -> {"event": "listening"}
    {"cmd": "send", "uids": [...], "n": N, "payload_size": 64, "chunk": 500}
                                                         -> {"event": "sent", ...}
"""

from __future__ import annotations

import json
import os
import time

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor

from redmessenger.compat import defer_autobahn_debug_formatting

from .control import Commands, serve
from .wire import FRAME, emit, payload, user_channel


class Sender(WebSocketServerProtocol):
    uid: str | None = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.uid is None:
            self.uid = json.loads(payload)["id"]
            self.factory.users[self.uid] = self
            self.sendMessage(json.dumps(
                {"type": "welcome", "id": self.uid, "channel": user_channel(self.uid),
                 "queued": 0, "ack": False}, separators=(",", ":")).encode())

    def onClose(self, wasClean, code, reason) -> None:
        if self.uid is not None:
            self.factory.users.pop(self.uid, None)


class Control(Commands):
    def __init__(self) -> None:
        # The floor, not a known cost: without this, pretty-printing debug
        # lines nobody logs is half of a bare Autobahn connect.
        defer_autobahn_debug_formatting()
        self.factory = WebSocketServerFactory()
        self.factory.protocol = Sender
        self.factory.users = {}
        self.boot = os.urandom(8).hex().encode()

    def do_listen(self, port: int) -> None:
        reactor.listenTCP(port, self.factory, interface="127.0.0.1", backlog=1024)
        emit({"event": "listening"})

    def do_send(self, uids: list[str], n: int, payload_size: int, chunk: int = 500) -> None:
        users = [self.factory.users[uid] for uid in uids]
        sources = [user_channel(uid).encode() for uid in uids]
        count = len(users)
        boot = self.boot
        timestamp = int(time.time() * 1000)
        t_start = time.monotonic()

        def batch(first: int) -> None:
            last = min(n, first + chunk)
            for seq in range(first, last):
                index = seq % count
                users[index].sendMessage(FRAME % (boot, seq + 1, sources[index], timestamp,
                                                  payload(seq, 0, payload_size)))
            if last < n:
                reactor.callLater(0, batch, last)
            else:
                emit({"event": "sent", "t_start": t_start, "t_end": time.monotonic()})

        batch(0)


def main() -> None:
    serve(Control())


if __name__ == "__main__":
    main()
