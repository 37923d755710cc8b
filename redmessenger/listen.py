"""``redmessenger listen``: a user's messages as they come, on stdout, for
debugging and for shell pipelines; how the connection goes, on stderr.

One JSON object a line: the message frame's ``id``, ``source``,
``timestamp``, ``queued`` and ``payload`` (``payload_base64`` for bytes that
are not UTF-8). With ``--raw``, the payload alone and a newline. It is the
Python client underneath, so it reconnects with backoff, and a refusal
that would only be repeated (a wrong key) ends it with status 1.

With ``--ack`` a message is acknowledged only once its line is written and
flushed to stdout. When the reader of a pipe goes away, the write fails:
that message and the ones after it are not acknowledged, and come again at
the next connect; ``listen`` then ends with status 0, as on Ctrl-C. A
reader that goes away while no message comes is noticed within a second
(``| head -n 2`` ends). (What
was flushed into the pipe before its reader went away had left ``listen``:
a consumer that must lose nothing reads what it is given, or is a client of
its own.)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
from typing import Any, BinaryIO, TextIO

from twisted.internet import defer
from twisted.internet.task import LoopingCall

from .client import Message, RedMessengerClient, Refused, ServerError, State, StateChange, Welcome


def line(message: Message, raw: bool) -> bytes:
    """What is written for one message."""
    if raw:
        return message.payload + b"\n"
    doc: dict[str, Any] = {"id": message.id, "source": message.source,
                           "timestamp": message.timestamp, "queued": message.queued}
    try:
        doc["payload"] = message.payload.decode("utf-8")
    except UnicodeDecodeError:
        doc["payload_base64"] = base64.b64encode(message.payload).decode("ascii")
    return json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n"


async def listen(reactor: Any, args: argparse.Namespace, out: BinaryIO, err: TextIO) -> int:
    """Until Ctrl-C (or SIGTERM), a closed stdout, or a refusal (status 1)."""
    key = args.key
    if args.key_file is not None:
        with open(args.key_file, encoding="utf-8") as file:
            key = file.read().strip()

    def say(text: str) -> None:
        print(f"redmessenger listen: {text}", file=err, flush=True)

    def closed(why: str) -> None:
        if client.running:
            say(f"stdout closed ({why})")
            _quiet(out)
            reactor.callLater(0, client.stopService)

    def show(message: Message) -> defer.Deferred | None:
        try:
            out.write(line(message, args.raw))
            out.flush()
        except OSError as e:
            closed(os.strerror(e.errno or 0) + (f"; message {message.id} and those after it "
                                                "are left for the next listen"
                                                if args.ack else ""))
            # Never handled, so never acknowledged; not refused either (a
            # refusal would reconnect for it): the client is stopping.
            return defer.Deferred()
        return None

    def watch() -> None:
        if _reader_gone(out):
            closed("its reader went away")

    def changed(change: StateChange) -> None:
        if change.state is State.CONNECTING:
            say(f"connecting to {args.url}")
        elif change.state is State.DISCONNECTED and change.retry_in is not None:
            why = f": {change.reason}" if change.reason else ""
            say(f"disconnected ({change.close_code}{why}); again in {change.retry_in:.1f} s")

    def welcomed(welcome: Welcome) -> None:
        say(f"welcomed as {welcome.id}{' in ack mode' if welcome.ack else ''}; "
            f"{welcome.queued} stored messages first")

    def error(frame: ServerError) -> None:
        say(f"error {frame.code}: {frame.reason}")

    client = RedMessengerClient(args.url, args.id, key=key, ack=args.ack, reactor=reactor,
                                on_message=show, on_state=changed, on_welcome=welcomed,
                                on_error=error)
    # Ctrl-C stops the reactor: the client first acknowledges what it
    # wrote, and closes (1000).
    reactor.addSystemEventTrigger("before", "shutdown", client.stopService)
    client.startService()
    watching = LoopingCall(watch)
    watching.clock = reactor
    watching.start(1.0, now=False)
    try:
        await client.whenStopped()
    except Refused as e:
        say(str(e))
        return 1
    finally:
        watching.stop()
    return 0


def _reader_gone(out: BinaryIO) -> bool:
    """Whether stdout is a pipe whose reader closed it (poll says so of its
    writing end; a terminal or a file never)."""
    try:
        poller = select.poll()
        poller.register(out.fileno(), 0)  # errors and hangups are always reported
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (OSError, ValueError):
        return False


def _quiet(out: BinaryIO) -> None:
    """Nothing more can be written to a closed pipe: what Python would still
    flush at exit goes nowhere, rather than into a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
