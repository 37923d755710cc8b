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

import os
import shutil
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from harness import RunningService, aiotest, eventually, run, tw

from redmessenger.settings import AuthMode

#: How long (ms) the browser side waits for anything it expects.
WAIT_MS = 10_000
#: Chromium flags for a headless run as root in a container, with nothing
#: reaching out to the network on its own.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
#: Quick reconnects, so that the reconnect tests take well under a second.
FAST = {"minDelay": 50, "maxDelay": 500}


def missing(what: str) -> None:
    """Skip (or, with REDMESSENGER_REQUIRE_BROWSER=1, fail) for want of ``what``."""
    if os.environ.get("REDMESSENGER_REQUIRE_BROWSER", "") not in ("", "0"):
        pytest.fail(f"REDMESSENGER_REQUIRE_BROWSER is set but {what}", pytrace=False)
    pytest.skip(what)


def find_chromium() -> str | None:
    named = os.environ.get("REDMESSENGER_CHROMIUM")
    if named:
        return shutil.which(named) or (named if os.access(named, os.X_OK) else None)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


# --------------------------------------------------------------------------
# Fixtures: one browser for the module, a fresh context (no shared storage,
# no shared sockets) for each test; both closed afterwards.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        missing("Python Playwright is not installed: pip install playwright "
                "(and no 'playwright install': the system's Chromium is used)")
    executable = find_chromium()
    if executable is None:
        missing("Chromium is not installed: apt-get install -y chromium "
                "(or set REDMESSENGER_CHROMIUM to a Chromium/Chrome executable)")

    async def launch():
        playwright = await async_playwright().start()
        try:
            return playwright, await playwright.chromium.launch(
                executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        except BaseException:
            await playwright.stop()
            raise

    playwright, chromium = run(launch())

    async def shut():
        try:
            await chromium.close()
        finally:
            await playwright.stop()

    try:
        yield chromium
    finally:
        run(shut())


class Tab:
    """A browser page, with what its RedMessengerClient saw recorded in
    ``window.rm`` (states, welcomes, messages, duplicates, errors)."""

    def __init__(self, page) -> None:
        self.page = page
        #: Uncaught exceptions in the page: none expected.
        self.problems: list[str] = []
        #: The console, for failure messages (failed reconnects log there).
        self.console: list[str] = []
        page.on("pageerror", lambda error: self.problems.append(str(error)))
        page.on("console", lambda message: self.console.append(
            f"{message.type}: {message.text}"))

    async def open(self, rm: RunningService) -> None:
        """Load the demo page from RedMessenger itself."""
        response = await self.page.goto(http_url(rm), wait_until="load")
        assert response is not None and response.ok, response

    async def start(self, url: str | None = None, **options) -> None:
        """Import ``/client.js`` from the page's origin, make a client
        (``url`` None: the default, derived from the page's location),
        record its events and connect."""
        await self.page.evaluate(START_CLIENT, {"url": url, "options": options})

    async def wait(self, predicate: str, arg: Any = None, what: str = "") -> Any:
        """Poll ``predicate`` (a JS function of ``rm`` and ``arg``) in the
        page until it is truthy, within a deadline; return its value."""
        try:
            handle = await self.page.wait_for_function(
                f"([arg]) => {{ const rm = window.rm; return ({predicate})(rm, arg); }}",
                arg=[arg], polling=20, timeout=WAIT_MS)
        except Exception as error:
            seen = await self.page.evaluate("JSON.stringify(window.rm ?? null)")
            raise AssertionError(f"the page did not see {what or predicate}: {error}\n"
                                 f"it saw: {seen}\nerrors: {self.problems}\n"
                                 f"console: {self.console}") from None
        return await handle.json_value()

    async def welcomed(self, count: int = 1) -> dict:
        """Wait for the ``count``-th welcome; return it."""
        return await self.wait("(rm, n) => rm.welcomes.length >= n && rm.welcomes[n - 1]",
                               count, f"welcome number {count}")

    async def messages(self, count: int) -> list[dict]:
        """Wait until ``count`` messages were dispatched; return them all."""
        return await self.wait("(rm, n) => rm.messages.length >= n && rm.messages",
                               count, f"{count} messages")

    async def recorded(self, name: str) -> Any:
        return await self.page.evaluate("(name) => window.rm[name]", name)

    async def evaluate(self, expression: str, arg: Any = None) -> Any:
        return await self.page.evaluate(expression, arg)


START_CLIENT = """async ({url, options}) => {
  const { RedMessengerClient } = await import("/client.js");
  const rm = window.rm = {
    states: [], welcomes: [], messages: [], duplicates: [], errors: [], client: null,
  };
  const plain = (detail) => {
    const copy = { ...detail };
    if (copy.payloadBytes) copy.payloadBytes = Array.from(copy.payloadBytes);
    return copy;
  };
  if (options.keys) {  // a key function: a promise of each in turn, null rejects
    const keys = options.keys;
    delete options.keys;
    rm.keyCalls = 0;
    options.key = async () => {
      const key = keys[Math.min(rm.keyCalls++, keys.length - 1)];
      if (key === null) throw new Error("no key yet");
      return key;
    };
  }
  const client = new RedMessengerClient(url ?? undefined, options);
  rm.client = client;
  rm.url = client.url;
  client.addEventListener("state", (e) => rm.states.push(e.detail));
  client.addEventListener("welcome", (e) => rm.welcomes.push(e.detail));
  client.addEventListener("message", (e) => rm.messages.push(plain(e.detail)));
  client.addEventListener("duplicate", (e) => rm.duplicates.push(plain(e.detail)));
  client.addEventListener("error", (e) => rm.errors.push(e.detail));
  client.connect();
}"""


@pytest.fixture
def tabs(browser) -> Iterator[Any]:
    """``tab = await tabs()``: a page in a fresh browser context; every
    context is closed after the test (which closes its sockets)."""
    contexts = []

    async def new_tab() -> Tab:
        context = await browser.new_context()
        contexts.append(context)
        return Tab(await context.new_page())

    async def close_all():
        for context in contexts:
            await context.close()

    try:
        yield new_tab
    finally:
        run(close_all())


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


def http_url(rm: RunningService, path: str = "/") -> str:
    return rm.url.replace("ws://", "http://", 1) + path.lstrip("/")


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
    assert welcome == {"type": "welcome", "id": "alice", "channel": "rm.users.alice",
                       "queued": 0, "ack": False}
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
    await eventually(lambda: not rm.dispatcher.online("bob"), what="bob to go offline")

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
    await eventually(lambda: not rm.dispatcher.online("dave"), what="dave to go offline")
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
    await eventually(lambda: not rm.dispatcher.online("grace"), what="grace to go offline")
    assert tab.problems == []
