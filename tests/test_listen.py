"""``redmessenger listen`` (redmessenger/listen.py), run as a user runs it:
a subprocess on a real RedMessenger, its stdout a real pipe."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile

from redmessenger.client import Message
from redmessenger.frames import Close
from redmessenger.listen import line
from redmessenger.settings import AuthMode

from commandline import CLI, CLI_TIMEOUT
from harness import aiotest, eventually


async def start_listening(rm, *args: str) -> asyncio.subprocess.Process:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REDMESSENGER_")}
    environment["PYTHONFAULTHANDLER"] = "1"
    return await asyncio.create_subprocess_exec(
        *CLI, "listen", "--url", rm.url, *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=environment, cwd=tempfile.gettempdir(),
        preexec_fn=as_from_a_terminal)


def as_from_a_terminal() -> None:
    """Ctrl-C as a terminal delivers it: a suite run in the background (as
    CI may be) hands its children SIGINT ignored, which Python, and then
    Twisted, leave ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def said(listener: asyncio.subprocess.Process, text: str) -> list[str]:
    """stderr's lines, up to the one that says ``text``."""
    lines = []
    while not lines or text not in lines[-1]:
        raw = await asyncio.wait_for(listener.stderr.readline(), CLI_TIMEOUT)
        assert raw, f"stderr ended before {text!r}: {lines}"
        lines.append(raw.decode())
    return lines


async def ended(listener: asyncio.subprocess.Process) -> tuple[int, str]:
    """Its status and the rest of its stderr, once it has ended by itself;
    if it has not within CLI_TIMEOUT, where it was (faulthandler's dump)."""
    try:
        rest = await asyncio.wait_for(listener.stderr.read(), CLI_TIMEOUT)
    except TimeoutError:
        listener.send_signal(signal.SIGABRT)
        dump = await asyncio.wait_for(listener.stderr.read(), CLI_TIMEOUT)
        raise AssertionError(f"listen did not end:\n{dump.decode()}") from None
    return await asyncio.wait_for(listener.wait(), CLI_TIMEOUT), rest.decode()


@aiotest
async def test_with_ack_what_could_not_be_written_stays_queued_when_the_reader_goes(messenger):
    """``listen --ack | consumer``: a consumer that reads two lines and goes
    away. The next message cannot be written: it and the one after it are
    not acknowledged, and wait in the queue; listen ends with status 0."""
    rm = await messenger()
    listener = await start_listening(rm, "--id", "user1", "--ack")
    await said(listener, "welcomed as user1 in ack mode")
    for payload in ("a", "b"):
        rm.publish("rm.users.user1", payload)
    first = [json.loads(await asyncio.wait_for(listener.stdout.readline(), CLI_TIMEOUT))
             for _ in range(2)]
    assert [(m["payload"], m["source"], m["queued"]) for m in first] == [
        ("a", "rm.users.user1", False), ("b", "rm.users.user1", False)]
    listener._transport.get_pipe_transport(1).close()  # the consumer is gone
    for payload in ("c", "d"):
        rm.publish("rm.users.user1", payload)
    code, rest = await ended(listener)
    assert code == 0, rest
    assert "stdout closed" in rest, rest
    assert "Traceback" not in rest, rest
    await eventually(lambda: [m["payload"] for m in rm.queue("user1")] == ["c", "d"],
                     what="c and d back in the queue, a and b acknowledged")


@aiotest
async def test_raw_payloads_through_a_reconnect_until_ctrl_c(messenger):
    """``--raw`` prints the payloads alone, bytes as they are; a dropped
    connection is followed by a reconnect; Ctrl-C ends it with status 0."""
    rm = await messenger()
    listener = await start_listening(rm, "--id", "user1", "--raw")
    await said(listener, "welcomed as user1;")
    rm.publish("rm.users.user1", "plain")
    assert await asyncio.wait_for(listener.stdout.readline(), CLI_TIMEOUT) == b"plain\n"
    rm.service.factory.close_all(Close.GOING_AWAY, "shutting_down", "the test drops it")
    lines = await said(listener, "welcomed as user1;")
    assert any("disconnected (1001" in text and "again in" in text for text in lines), lines
    rm.publish("rm.users.user1", b"\xff\x00 bytes")
    assert await asyncio.wait_for(listener.stdout.readline(), CLI_TIMEOUT) == b"\xff\x00 bytes\n"
    listener.send_signal(signal.SIGINT)
    code, rest = await ended(listener)
    assert code == 0 and "Traceback" not in rest, rest


@aiotest
async def test_a_refused_key_ends_it_with_status_1(messenger, redis):
    rm = await messenger(auth=AuthMode.REQUIRED)
    redis.command("SET", "rm:users:user1:key", "s3cret")
    listener = await start_listening(rm, "--id", "user1", "--key", "wrong")
    code, rest = await ended(listener)
    assert code == 1 and "refused with close code 4001" in rest, rest


def test_a_line_is_the_message_frame_s_fields_and_bytes_come_in_base64() -> None:
    message = Message("m1", "rm.users.u", 1700000000000, "é".encode(), True, True)
    assert json.loads(line(message, raw=False)) == {
        "id": "m1", "source": "rm.users.u", "timestamp": 1700000000000, "queued": True,
        "payload": "é"}
    binary = Message("m2", "rm.users.u", 1, b"\xff", True, False)
    assert json.loads(line(binary, raw=False))["payload_base64"] == "/w=="
    assert line(binary, raw=True) == b"\xff\n"
