"""The browser client (``/client.js``) and the demo page (``/``) in a real
headless Chromium, against a real RedMessenger.

Chromium is driven with Python Playwright's async API on the reactor's own
asyncio loop (the wheel carries its own driver; no Node.js to install). The
browser is the system's Chromium, not one Playwright downloads::

    apt-get install -y chromium          # Debian/Ubuntu: /usr/bin/chromium
    pip install playwright               # do not run "playwright install"

Without either the tests are skipped, saying which is missing, unless
``REDMESSENGER_REQUIRE_BROWSER=1`` (for CI), which makes that a failure.
``REDMESSENGER_CHROMIUM`` names another Chromium or Chrome executable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from redmessenger.settings import AuthMode

from chromium import WAIT_MS
from harness import RunningService, aiotest, eventually, run, tw

#: Quick reconnects, so that the reconnect tests take well under a second.
FAST = {"minDelay": 50, "maxDelay": 500}


@pytest.fixture
def restart(redis) -> Iterator[Any]:
    """``rm = await restart(rm)``: stop a RedMessenger and start a new one
    on the same port (what a deploy looks like to browsers); the new ones
    are stopped after the test."""
    from redmessenger import RedMessengerService, Settings

    started = []

    async def restart_on_same_port(old: RunningService) -> RunningService:
        port = urlsplit(old.url).port
        await old.stop()
        service = RedMessengerService(Settings(
            port=f"tcp:{port}:interface=127.0.0.1", redis=redis.address, auth=AuthMode.OFF))
        service.startService()
        started.append(service)
        await tw(service.whenListening())
        await tw(service.subscriber.whenSubscribed())
        await tw(service.redis.whenConnected())
        return RunningService(service, redis)

    async def stop_all():
        for service in started:
            if service.running:
                await tw(service.stopService())

    try:
        yield restart_on_same_port
    finally:
        run(stop_all())


class Gate:
    """A TCP relay between the browser and RedMessenger that can do what a
    network does to a connection: ``cut()`` closes both ends (the browser
    sees 1006), ``freeze()`` silently drops everything both ways and keeps
    both ends open (a NAT that forgot the connection, a laptop that slept).
    Connections made afterwards are relayed again."""

    def __init__(self, target: RunningService) -> None:
        self.target_port = urlsplit(target.url).port
        self.server: asyncio.Server | None = None
        self.url = ""
        #: The open connections: [browser writer, server writer, frozen].
        self.links: list[list[Any]] = []
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> Gate:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"
        return self

    async def _relay(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        link = [writer, up_writer, False]
        self.links.append(link)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pump(source, sink, link))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _pump(source, sink, link) -> None:
        try:
            while data := await source.read(65536):
                if not link[2]:
                    sink.write(data)
                    await sink.drain()
        except ConnectionError:
            pass
        if not link[2]:  # a frozen link keeps the other end open: nobody tells it
            sink.close()

    def cut(self) -> None:
        for browser_side, server_side, _ in self.links:
            browser_side.close()
            server_side.close()
        self.links.clear()

    def freeze(self) -> None:
        for link in self.links:
            link[2] = True

    async def stop(self) -> None:
        for link in self.links:
            link[2] = False
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
def gate() -> Iterator[Any]:
    """``relay = await gate(rm)``: a :class:`Gate` in front of ``rm``; all
    are stopped after the test."""
    gates: list[Gate] = []

    async def open_gate(target: RunningService) -> Gate:
        relay = Gate(target)
        gates.append(relay)
        return await relay.start()

    async def stop_all():
        for relay in gates:
            await relay.stop()

    try:
        yield open_gate
    finally:
        run(stop_all())


def stored(rm: RunningService, uid: str, count: int):
    """A check for ``eventually``: the user's queue holds ``count`` entries."""
    return lambda: len(rm.queue(uid)) == count


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


@aiotest
async def test_a_page_receives_a_message_published_while_it_is_open(messenger, tabs):
    rm = await messenger()
    tab = await tabs()
    await tab.open(rm)
    await tab.start(id="alice")  # the URL comes from the page's location
    assert await tab.recorded("url") == rm.url
    welcome = await tab.welcomed()
    # The page asked for heartbeats: every --ping-interval (30 s by default).
    assert welcome == {"type": "welcome", "id": "alice", "channel": "rm.users.alice",
                       "queued": 0, "ack": False, "heartbeat": 30}
    assert [s["state"] for s in await tab.recorded("states")] == [
        "connecting", "open", "welcomed"]

    assert rm.publish("rm.users.alice", "Hello, browser! ✓") == 1
    [message] = await tab.messages(1)
    assert message["payload"] == "Hello, browser! ✓"
    assert message["source"] == "rm.users.alice"
    assert message["queued"] is False and message["bubble"] is True
    assert isinstance(message["id"], str) and isinstance(message["timestamp"], int)
    assert "payloadBytes" not in message and "tag" not in message
    assert tab.problems == []


@aiotest
async def test_a_message_published_while_the_page_was_closed_arrives_when_it_opens(
        messenger, tabs):
    rm = await messenger()
    first = await tabs()
    await first.open(rm)
    await first.start(id="bob")
    await first.welcomed()
    await first.page.close()
    await eventually(lambda: not rm.dispatcher.users, what="bob to go offline")

    rm.publish("rm.users.bob", "while you were out")
    await eventually(stored(rm, "bob", 1), what="the message to be stored")

    second = await tabs()
    await second.open(rm)
    await second.start(id="bob")
    assert (await second.welcomed())["queued"] == 1
    [message] = await second.messages(1)
    assert message["payload"] == "while you were out"
    assert message["queued"] is True and message["source"] == "rm.users.bob"
    assert rm.queue("bob") == []
    assert second.problems == []


@aiotest
async def test_the_page_reconnects_by_itself_when_the_server_comes_back(
        messenger, tabs, restart):
    rm = await messenger()
    tab = await tabs()
    await tab.open(rm)
    await tab.start(id="carol", **FAST)
    await tab.welcomed()

    rm = await restart(rm)
    await tab.welcomed(2)
    closes = [s for s in await tab.recorded("states") if s["state"] == "closed"]
    assert closes[0]["code"] == 1001 and closes[0]["final"] is False  # shutting_down
    assert all(0 <= c["retryIn"] <= FAST["maxDelay"] for c in closes)

    assert rm.publish("rm.users.carol", "after the restart") == 1
    [message] = await tab.messages(1)
    assert message["payload"] == "after the restart" and message["queued"] is False
    assert tab.problems == []


@aiotest
async def test_ack_mode_acknowledges_and_drops_redeliveries(messenger, tabs, restart):
    rm = await messenger()
    tab = await tabs()
    await tab.open(rm)
    await tab.start(id="dave", ack=True, ackDelay=20, **FAST)
    assert (await tab.welcomed())["ack"] is True

    # Acks go out (gathered by the short timer) and reach the server.
    for n in (1, 2):
        rm.publish("rm.users.dave", f"m{n}")
    first, second = await tab.messages(2)
    assert (first["tag"], second["tag"]) == (1, 2)
    await eventually(lambda: rm.dispatcher.stats.acked == 2, what="both acks at the server")

    # m3 arrives but its ack is held back; the server restarts, so m3 goes
    # back to the queue (m1 and m2, acknowledged, do not) ...
    await tab.evaluate("() => { window.rm.client.ackDelay = 2 ** 30; }")
    rm.publish("rm.users.dave", "m3")
    third = (await tab.messages(3))[2]
    await tab.evaluate("() => { window.rm.client.ackDelay = 0; }")
    port = rm.service.port.getHost().port
    await rm.stop()
    assert [entry["payload"] for entry in rm.queue("dave")] == ["m3"]

    # ... and is delivered again after the reconnect: acknowledged, not
    # dispatched a second time.
    rm = await restart(rm)
    assert rm.service.port.getHost().port == port
    await tab.welcomed(2)
    [duplicate] = await tab.wait("(rm) => rm.duplicates.length >= 1 && rm.duplicates",
                                 what="the redelivered m3")
    assert duplicate["id"] == third["id"] and duplicate["queued"] is True
    await eventually(lambda: rm.dispatcher.stats.acked == 1, what="the ack of the redelivery")

    rm.publish("rm.users.dave", "m4")
    messages = await tab.messages(4)
    assert [m["payload"] for m in messages] == ["m1", "m2", "m3", "m4"]
    assert len({m["id"] for m in messages}) == 4
    await eventually(lambda: rm.dispatcher.stats.acked == 2, what="the ack of m4")

    # Closing acknowledges what is left; nothing comes back to the queue.
    await tab.evaluate("() => window.rm.client.close()")
    await eventually(lambda: not rm.dispatcher.users, what="dave to go offline")
    await rm.stop()
    assert rm.queue("dave") == []
    assert len(await tab.recorded("messages")) == 4
    assert tab.problems == []


@aiotest
async def test_a_binary_payload_arrives_as_bytes(messenger, tabs):
    rm = await messenger()
    tab = await tabs()
    await tab.open(rm)
    await tab.start(id="erin")
    await tab.welcomed()
    payload = bytes(range(256))  # not UTF-8: sent as payload_base64
    rm.publish("rm.users.erin", payload)
    [message] = await tab.messages(1)
    assert "payload" not in message
    assert bytes(message["payloadBytes"]) == payload
    assert tab.problems == []


@aiotest
async def test_a_refusal_is_final(messenger, tabs, redis):
    rm = await messenger(auth=AuthMode.REQUIRED)
    redis.command("SET", "rm:users:frank:key", "right")
    tab = await tabs()
    await tab.open(rm)
    await tab.start(id="frank", key="wrong", **FAST)
    closed = await tab.wait("(rm) => rm.states.find((s) => s.state === 'closed')",
                            what="the socket to close")
    assert closed["code"] == 4001 and closed["final"] is True
    [error] = await tab.recorded("errors")
    assert error["type"] == "error" and error["code"] == "unauthorized"
    # No reconnect pending: the client is done.
    assert await tab.evaluate("() => window.rm.client._retryTimer === null")
    assert [s["state"] for s in await tab.recorded("states")] == [
        "connecting", "open", "closed"]


@aiotest
async def test_a_protocol_error_is_final_too(messenger, tabs):
    """A hello bigger than --max-frame gets 1009 (frame_too_big): sent again,
    it would be refused again, so the page gives up, as the Python client does."""
    rm = await messenger(max_frame=1024)
    tab = await tabs()
    await tab.open(rm)
    await tab.start(id="gina", key="k" * 2000, **FAST)
    closed = await tab.wait("(rm) => rm.states.find((s) => s.state === 'closed')",
                            what="the socket to close")
    assert closed["code"] == 1009 and closed["final"] is True
    assert [e["code"] for e in await tab.recorded("errors")] == ["frame_too_big"]
    assert await tab.evaluate("() => window.rm.client._retryTimer === null")


@aiotest
async def test_a_key_function_is_asked_before_every_attempt(messenger, tabs, redis):
    rm = await messenger(auth=AuthMode.REQUIRED)
    redis.command("SET", "rm:users:heidi:key", "right")
    tab = await tabs()
    await tab.open(rm)
    await tab.start(id="heidi", keys=[None, "right"], **FAST)
    await tab.welcomed()
    states = await tab.recorded("states")
    assert [s["state"] for s in states] == [
        "connecting", "closed", "connecting", "open", "welcomed"]
    assert states[1]["code"] == 1006 and states[1]["final"] is False
    assert "no key yet" in states[1]["reason"]
    assert await tab.recorded("errors") == [{
        "type": "error", "code": "key_failed", "reason": "could not get the key: no key yet"}]
    assert await tab.recorded("keyCalls") == 2
    rm.publish("rm.users.heidi", "authenticated")
    assert (await tab.messages(1))[0]["payload"] == "authenticated"


@aiotest
async def test_the_demo_page_shows_published_messages(messenger, tabs):
    rm = await messenger()
    tab = await tabs()
    await tab.open(rm)
    page = tab.page
    await page.fill("#id", "grace")
    await page.click("#connect")
    await page.wait_for_selector('#status[data-state="welcomed"]', timeout=WAIT_MS)
    assert "rm.users.grace" in await page.text_content("#status")

    assert rm.publish("rm.users.grace", "Hi Grace <b>not bold</b>") == 1
    item = await page.wait_for_selector("#messages li", timeout=WAIT_MS)
    assert await item.query_selector("b") is None  # shown as text, not HTML
    assert await page.text_content("#messages li .payload") == "Hi Grace <b>not bold</b>"
    meta = await page.text_content("#messages li .meta")
    assert "rm.users.grace" in meta and "live" in meta and "no bubble" not in meta

    await page.click("#disconnect")
    await page.wait_for_selector('#status[data-state="closed"]', timeout=WAIT_MS)
    await eventually(lambda: not rm.dispatcher.users, what="grace to go offline")
    assert tab.problems == []


# --------------------------------------------------------------------------
# Handling: a message is acknowledged once handled, refused when that fails
# --------------------------------------------------------------------------

#: A listener that throws the first time it sees m2.
THROW_ONCE_ON_M2 = """(client, rm) => {
  rm.thrown = 0;
  client.addEventListener("message", (event) => {
    if (event.detail.payload === "m2" && rm.thrown++ === 0) throw new Error("m2 not now");
  });
}"""


@aiotest
async def test_ack_mode_refuses_a_message_whose_listener_throws_and_gets_it_again(
        messenger, tabs):
    rm = await messenger()
    tab = await tabs()
    await tab.open(rm)
    await tab.start(id="ivan", ack=True, ackDelay=0, setup=THROW_ONCE_ON_M2, **FAST)
    await tab.welcomed()
    for n in (1, 2, 3):
        rm.publish("rm.users.ivan", f"m{n}")

    # m2 is refused: the client reconnects and gets m2 again, then m3.
    messages = await tab.messages(4)
    assert [m["payload"] for m in messages] == ["m1", "m2", "m2", "m3"]
    assert messages[1]["id"] == messages[2]["id"]
    assert len(await tab.recorded("welcomes")) == 2
    [error] = await tab.recorded("errors")
    assert error["code"] == "handler_failed" and error["id"] == messages[1]["id"]
    assert "m2 not now" in error["reason"]
    closed = [s for s in await tab.recorded("states") if s["state"] == "closed"]
    assert len(closed) == 1 and closed[0]["code"] == 1000 and closed[0]["final"] is False

    # m1 on the first socket, m2 and m3 on the second: each once, none left.
    await eventually(lambda: rm.dispatcher.stats.acked == 3, what="three acks")
    await tab.evaluate("() => window.rm.client.close()")
    await eventually(lambda: not rm.dispatcher.users, what="ivan to go offline")
    assert rm.queue("ivan") == []
    assert len(tab.problems) == 1 and "m2 not now" in tab.problems[0]


#: An async listener whose work takes several ack delays, and fails on m1
#: at first.
SLOW_LISTENER = """(client, rm) => {
  rm.calls = [];
  rm.handled = [];
  client.addEventListener("message", async ({ detail: message }) => {
    rm.calls.push(message.payload);
    await new Promise((resolve) => setTimeout(resolve, 5 * client.ackDelay));
    if (message.payload === "m1" && rm.calls.length === 1) throw new Error("m1 failed");
    rm.handled.push(message.payload);
  });
}"""


@aiotest
async def test_ack_mode_refuses_a_message_whose_async_listener_rejects_late(messenger, tabs):
    rm = await messenger()
    tab = await tabs()
    await tab.open(rm)
    await tab.start(id="jack", ack=True, ackDelay=20, setup=SLOW_LISTENER, **FAST)
    await tab.welcomed()
    rm.publish("rm.users.jack", "m1")
    rm.publish("rm.users.jack", "m2")

    # The rejection comes long after the ack delay, and still refuses m1; m2
    # waited for m1 and comes again with it.
    assert await tab.wait("(rm) => rm.handled.length >= 2 && rm.handled",
                          what="m1 and m2 handled") == ["m1", "m2"]
    assert await tab.recorded("calls") == ["m1", "m1", "m2"]
    [error] = await tab.recorded("errors")
    assert error["code"] == "handler_failed" and "m1 failed" in error["reason"]
    await eventually(lambda: rm.dispatcher.stats.acked == 2, what="the acks of m1 and m2")
    await tab.evaluate("() => window.rm.client.close()")
    await eventually(lambda: not rm.dispatcher.users, what="jack to go offline")
    assert rm.queue("jack") == []
    assert tab.problems == []


#: A listener that returns a promise the test fulfils.
PROMISING_LISTENER = """(client, rm) => {
  rm.release = null;
  client.addEventListener("message", () => new Promise((resolve) => {
    rm.pendingSince = performance.now();
    rm.release = resolve;
  }));
}"""


@aiotest
async def test_ack_mode_acknowledges_only_once_the_listeners_promise_fulfils(
        messenger, tabs, restart):
    rm = await messenger()
    tab = await tabs()
    await tab.open(rm)
    await tab.start(id="kate", ack=True, ackDelay=20, setup=PROMISING_LISTENER, **FAST)
    await tab.welcomed()
    rm.publish("rm.users.kate", "m1")

    # Long past the ack delay, the listener is still at work: no ack yet, so
    # a server stop puts m1 back in the queue.
    await tab.wait("(rm) => rm.release && performance.now() - rm.pendingSince > "
                   "10 * rm.client.ackDelay", what="the listener at work for 10 ack delays")
    await rm.stop()
    assert [entry["payload"] for entry in rm.queue("kate")] == ["m1"]

    # It finishes while the server is away: the copy that comes back is
    # only acknowledged.
    await tab.evaluate("() => window.rm.release()")
    rm = await restart(rm)
    await tab.welcomed(2)
    [duplicate] = await tab.wait("(rm) => rm.duplicates.length >= 1 && rm.duplicates",
                                 what="m1 again")
    assert duplicate["payload"] == "m1" and len(await tab.recorded("messages")) == 1
    await eventually(lambda: rm.dispatcher.stats.acked == 1, what="the ack of m1")
    await tab.evaluate("() => window.rm.client.close()")
    await eventually(lambda: not rm.dispatcher.users, what="kate to go offline")
    assert rm.queue("kate") == []
    assert tab.problems == []


#: A listener that keeps every message for later, to settle it by hand.
HOLDING_LISTENER = """(client, rm) => {
  rm.held = [];
  client.addEventListener("message", (event) => {
    event.preventDefault();
    rm.held.push(event.detail);
  });
}"""


@aiotest
async def test_a_listener_that_holds_a_message_settles_it_with_ack_or_nack(messenger, tabs):
    rm = await messenger()
    tab = await tabs()
    await tab.open(rm)
    await tab.start(id="liam", ack=True, ackDelay=0, setup=HOLDING_LISTENER, **FAST)
    await tab.welcomed()
    rm.publish("rm.users.liam", "m1")
    rm.publish("rm.users.liam", "m2")
    held = "(rm, n) => rm.held.length >= n && rm.held.map((m) => m.payload)"

    assert await tab.wait(held, 1) == ["m1"]  # m2 waits for m1 to be settled
    await tab.evaluate("() => window.rm.held[0].nack('not yet')")
    assert await tab.wait(held, 2) == ["m1", "m1"]
    [error] = await tab.recorded("errors")
    assert error["code"] == "handler_failed" and "not yet" in error["reason"]
    assert rm.dispatcher.stats.acked == 0

    await tab.evaluate("() => window.rm.held[1].ack()")
    assert await tab.wait(held, 3) == ["m1", "m1", "m2"]
    await eventually(lambda: rm.dispatcher.stats.acked == 1, what="the ack of m1")
    await tab.evaluate("() => window.rm.held[2].ack()")
    await eventually(lambda: rm.dispatcher.stats.acked == 2, what="the ack of m2")
    await tab.evaluate("() => window.rm.client.close()")
    await eventually(lambda: not rm.dispatcher.users, what="liam to go offline")
    assert rm.queue("liam") == []
    assert tab.problems == []


#: A listener object that cannot handle m1 (and one removed before it is
#: called).
FAILING_LISTENER = """(client, rm) => {
  rm.handled = [];
  const removed = () => { throw new Error("a removed listener was called"); };
  client.addEventListener("message", removed);
  client.removeEventListener("message", removed);
  client.addEventListener("message", {
    handleEvent({ detail: message }) {
      if (message.payload === "m1") throw new Error("cannot show m1");
      rm.handled.push(message.payload);
    },
  });
}"""


@aiotest
async def test_plain_mode_reports_a_failing_listener_and_goes_on(messenger, tabs):
    rm = await messenger()
    tab = await tabs()
    await tab.open(rm)
    await tab.start(id="mia", setup=FAILING_LISTENER, **FAST)
    await tab.welcomed()
    rm.publish("rm.users.mia", "m1")
    rm.publish("rm.users.mia", "m2")
    assert await tab.wait("(rm) => rm.handled.length >= 1 && rm.handled",
                          what="m2 handled") == ["m2"]
    [error] = await tab.recorded("errors")
    assert error["code"] == "handler_failed" and "cannot show m1" in error["reason"]
    # Nothing to refuse in plain mode: the connection stays.
    assert [s["state"] for s in await tab.recorded("states")] == [
        "connecting", "open", "welcomed"]
    assert len(tab.problems) == 1 and "cannot show m1" in tab.problems[0]


@aiotest
async def test_plain_mode_drops_a_copy_of_a_message_it_already_handled(
        messenger, tabs, redis):
    rm = await messenger()
    rm.publish("rm.users.nina", "once")
    await eventually(stored(rm, "nina", 1), what="the message to be stored")
    queue = "rm:users:nina:messages"
    redis.command("RPUSH", queue, redis.command("LINDEX", queue, 0))  # same id twice

    tab = await tabs()
    await tab.open(rm)
    await tab.start(id="nina")
    assert (await tab.welcomed())["queued"] == 2
    [duplicate] = await tab.wait("(rm) => rm.duplicates.length >= 1 && rm.duplicates",
                                 what="the second copy")
    [message] = await tab.recorded("messages")
    assert message["payload"] == duplicate["payload"] == "once"
    assert message["id"] == duplicate["id"]
    assert tab.problems == []


# --------------------------------------------------------------------------
# Reconnecting: backoff, a key that never comes, a dead connection
# --------------------------------------------------------------------------

#: Every jitter at the top of its range, so that each delay is its ceiling.
TOP_JITTER = "() => { Math.random = () => 0.999; }"


@aiotest
async def test_a_server_that_welcomes_then_drops_is_retried_less_and_less_often(
        messenger, tabs, gate):
    rm = await messenger()
    relay = await gate(rm)
    tab = await tabs()
    await tab.open(rm)
    await tab.start(relay.url, id="olga", setup=TOP_JITTER, minDelay=50, maxDelay=400,
                    stableAfter=2000)
    for n in range(1, 6):
        await tab.welcomed(n)
        relay.cut()  # just after the welcome
    await tab.welcomed(6)

    states = await tab.recorded("states")
    closes = [(i, s) for i, s in enumerate(states) if s["state"] == "closed"]
    assert all(s["code"] == 1006 and s["final"] is False for _, s in closes)
    assert [s["retryIn"] for _, s in closes] == [50, 100, 200, 400, 400]
    for i, closed in closes:  # and the page waited that long each time
        following = states[i + 1]
        assert following["state"] == "connecting"
        assert following["at"] - closed["at"] >= closed["retryIn"] - 1, states

    # A connection that stayed up for stableAfter starts the backoff over.
    await tab.wait("(rm) => performance.now() - rm.states.at(-1).at >= rm.client.stableAfter",
                   what="the connection up for stableAfter")
    relay.cut()
    closed = await tab.wait("(rm) => rm.states.at(-1).state === 'closed' && rm.states.at(-1)",
                            what="the cut")
    assert closed["retryIn"] == 50
    assert tab.problems == []


@aiotest
async def test_a_key_that_never_comes_is_given_up_after_key_timeout(messenger, tabs, redis):
    rm = await messenger(auth=AuthMode.REQUIRED)
    redis.command("SET", "rm:users:oscar:key", "right")
    tab = await tabs()
    await tab.open(rm)
    await tab.start(id="oscar", keys=["never", "right"], keyTimeout=200, **FAST)
    await tab.welcomed()
    states = await tab.recorded("states")
    assert [s["state"] for s in states] == [
        "connecting", "closed", "connecting", "open", "welcomed"]
    assert states[1]["code"] == 1006 and states[1]["final"] is False
    assert states[1]["at"] - states[0]["at"] >= 200 - 1
    assert await tab.recorded("errors") == [{
        "type": "error", "code": "key_timeout", "reason": "the key did not come within 200 ms"}]
    assert await tab.recorded("keyCalls") == 2
    assert tab.problems == []


#: The page's time of the last message.
LAST_MESSAGE_AT = """(client, rm) => {
  client.addEventListener("message", () => { rm.lastAt = performance.now(); });
}"""


@aiotest
async def test_an_idle_timeout_gives_up_a_dead_connection_and_its_message_comes_again(
        messenger, tabs, gate):
    rm = await messenger(ping_interval=0.2, ping_timeout=0.2)
    relay = await gate(rm)
    tab = await tabs()
    await tab.open(rm)
    await tab.start(relay.url, id="pia", ack=True, ackDelay=0, idleTimeout=1500,
                    setup=LAST_MESSAGE_AT, **FAST)
    await tab.welcomed()

    # Traffic more often than the idle timeout, for longer than it: no drop.
    for n in range(8):
        rm.publish("rm.users.pia", f"live{n}")
        await tab.messages(n + 1)
        await tab.wait("(rm) => performance.now() - rm.lastAt >= 250", what="a quarter second")
    assert len(await tab.recorded("welcomes")) == 1 and await tab.recorded("errors") == []

    # The connection dies without a word; the message sent into it is not
    # acknowledged, and comes on the connection made after the idle timeout.
    relay.freeze()
    rm.publish("rm.users.pia", "into the void")
    messages = await tab.messages(9)
    assert messages[-1]["payload"] == "into the void" and len(messages) == 9
    errors = await tab.recorded("errors")
    assert errors and {e["code"] for e in errors} == {"idle_timeout"}
    closed = next(s for s in await tab.recorded("states") if s["state"] == "closed")
    assert closed["code"] == 1006 and "idle timeout" in closed["reason"]
    await eventually(lambda: rm.dispatcher.stats.acked == 9, what="nine acks")
    await tab.evaluate("() => window.rm.client.close()")
    await eventually(lambda: not rm.dispatcher.users, what="pia to go offline")
    assert rm.queue("pia") == []
    assert tab.problems == []


#: The page's view of time, to compare with its recorded states.
PAGE_NOW = "() => performance.now()"


@aiotest
async def test_by_default_missing_heartbeats_give_up_a_dead_connection_and_lose_nothing(
        messenger, tabs, gate):
    interval = 1.0  # a heartbeat late by 1.5 intervals (a loaded machine) is not a loss
    rm = await messenger(ping_interval=interval, ping_timeout=1.0)
    relay = await gate(rm)
    tab = await tabs()
    await tab.open(rm)
    await tab.start(relay.url, id="hugo", ack=True, ackDelay=0, **FAST)
    welcome = await tab.welcomed()
    assert welcome["heartbeat"] == interval
    idle_ms = 2.5 * interval * 1000
    assert await tab.evaluate("() => window.rm.client._idleLimit()") == idle_ms

    # Quiet for twice the idle timeout: the heartbeats keep the connection up.
    await tab.wait("(rm, ms) => performance.now() - rm.states.at(-1).at >= ms", 2 * idle_ms,
                   what="a quiet spell of twice the idle timeout")
    assert len(await tab.recorded("welcomes")) == 1 and await tab.recorded("errors") == []
    assert await tab.recorded("messages") == []  # heartbeats are not messages

    # The connection dies without a word: noticed within the idle timeout,
    # and the message sent into it arrives once, on the next connection.
    relay.freeze()
    frozen_at = await tab.evaluate(PAGE_NOW)
    rm.publish("rm.users.hugo", "into the void")
    await tab.messages(1)
    rm.publish("rm.users.hugo", "after it")
    messages = await tab.messages(2)
    assert [m["payload"] for m in messages] == ["into the void", "after it"]
    assert await tab.recorded("duplicates") == []
    [error] = await tab.recorded("errors")
    assert error["code"] == "idle_timeout"
    assert int(error["reason"].split(" for ")[1].split()[0]) >= idle_ms, error
    closed = next(s for s in await tab.recorded("states") if s["state"] == "closed")
    assert closed["code"] == 1006 and closed["final"] is False
    assert closed["at"] - frozen_at <= idle_ms + 3000, (closed, frozen_at)
    await eventually(lambda: rm.dispatcher.stats.acked == 2, what="two acks")
    await tab.evaluate("() => window.rm.client.close()")
    await eventually(lambda: not rm.dispatcher.users, what="hugo to go offline")
    assert rm.queue("hugo") == []
    assert tab.problems == []


@pytest.mark.parametrize(("idle_timeout", "heartbeat", "limit"),
                         [(4000, 0.5, 4000), (0, None, 0)])
@aiotest
async def test_an_idle_timeout_the_page_sets_wins_and_0_asks_for_no_heartbeats(
        messenger, tabs, idle_timeout, heartbeat, limit):
    rm = await messenger(ping_interval=0.5)
    tab = await tabs()
    await tab.open(rm)
    await tab.start(id="ida", idleTimeout=idle_timeout)
    welcome = await tab.welcomed()
    assert welcome.get("heartbeat") == heartbeat
    assert await tab.evaluate("() => window.rm.client._idleLimit()") == limit
    rm.publish("rm.users.ida", "still here")
    assert [m["payload"] for m in await tab.messages(1)] == ["still here"]
    assert await tab.recorded("errors") == [] and tab.problems == []
