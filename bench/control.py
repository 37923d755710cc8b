"""The command channel of the bench's baseline processes: JSON lines on
stdin, each ``{"cmd": name, ...}`` calling ``do_<name>(...)``; an error is
reported as an event, and the process ends when the coordinator goes."""

from __future__ import annotations

import json

from twisted.internet import reactor, stdio
from twisted.protocols.basic import LineReceiver

from .wire import emit


class Commands(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 24

    def lineReceived(self, line: bytes) -> None:
        command = json.loads(line)
        try:
            getattr(self, "do_" + command.pop("cmd"))(**command)
        except Exception as e:
            emit({"event": "error", "error": repr(e)})

    def connectionLost(self, reason) -> None:
        if reactor.running:
            reactor.stop()


def serve(commands: Commands) -> None:
    """Take commands on stdin until the coordinator closes it."""
    stdio.StandardIO(commands)
    reactor.run()
