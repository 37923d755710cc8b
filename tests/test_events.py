"""Server-Sent Events (``GET /events``, ``POST /events/ack``) against a real
service and Redis, read by a raw HTTP client (tests/sse.py) and by curl:
every message published is counted out exactly once, through resumes,
full windows, slow readers and refusals."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import pytest

from redmessenger import AuthMode

from harness import RECV_TIMEOUT, aiotest, eventually, get, http_url, metric
from sse import EventStreamClient


def port_of(rm) -> int:
    return rm.service.port.getHost().port


async def stream(rm, uid: str, headers: dict | None = None, **kwargs) -> EventStreamClient:
    client = await EventStreamClient.open(port_of(rm), f"/events?id={uid}", headers, **kwargs)
    rm.clients.append(client)
    return client


def payloads(events) -> list[str]:
    return [event.json()["payload"] for event in events]


def publish(rm, uid: str, payloads) -> None:
    for payload in payloads:
        rm.publish(f"rm.users.{uid}", payload)


async def stored(rm, uid: str, count: int) -> list[dict]:
    """Wait until ``uid``'s queue holds ``count`` messages."""
    await eventually(lambda: len(rm.queue(uid)) == count, what=f"{count} stored for {uid}")
    return rm.queue(uid)


@aiotest
async def test_a_stream_is_welcomed_then_gets_stored_and_live_messages_with_their_ids(
        messenger) -> None:
    rm = await messenger()
    publish(rm, "u", ["one", "two", "three"])
    await stored(rm, "u", 3)
    client = await stream(rm, "u")
    assert client.status == 200
    assert client.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert client.chunked and client.headers["cache-control"] == "no-store"
    welcome = await client.event()
    assert welcome.type == "welcome"
    assert welcome.json() == {"type": "welcome", "id": "u", "channel": "rm.users.u",
                              "queued": 3, "ack": True}
    assert client.retry == 1000
    first = await client.events(3)
    publish(rm, "u", ["four", "five"])
    then = await client.events(2)
    assert payloads(first + then) == ["one", "two", "three", "four", "five"]
    assert all(e.type == "message" and e.id == e.json()["id"] for e in first + then)
    assert [e.json()["queued"] for e in first + then] == [True] * 3 + [False] * 2
    text = (await get(http_url(rm, "/metrics")))[2].decode()
    assert metric(text, "redmessenger_event_streams") == 1
    assert metric(text, "redmessenger_connections") == 1
    client.abort()
    # Nothing was acknowledged: all five go back, in order.
    assert [m["payload"] for m in await stored(rm, "u", 5)] == payloads(first + then)


@aiotest
async def test_an_http_1_0_stream_is_not_chunked_and_ends_with_its_connection(
        messenger) -> None:
    rm = await messenger(ping_interval=0.2)
    client = await stream(rm, "u", version="HTTP/1.0")
    assert client.status == 200 and not client.chunked
    assert (await client.event()).type == "welcome"
    publish(rm, "u", ["a", "b"])
    assert payloads(await client.events(2)) == ["a", "b"]
    await client.pings(2)
    assert client.comments == ["ping", "ping"]
    await rm.stop()
    rest = await client.ended()  # the stop ends it with an error event
    assert [e.type for e in rest] == ["error"]
    assert rest[0].json()["code"] == "shutting_down"
    assert [m["payload"] for m in rm.queue("u")] == ["a", "b"]
