"""A real headless Chromium, driven by Playwright, for the browser client's
tests: how to find it, and a :class:`Tab` that records what a page's
RedMessengerClient saw. The ``browser`` and ``tabs`` fixtures (conftest.py)
hand them to tests."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

from harness import RunningService, http_url

#: How long (ms) the browser side waits for anything it expects.
WAIT_MS = 10_000
#: Chromium flags for a headless run as root in a container, with nothing
#: reaching out to the network on its own.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


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
        page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))

    async def open(self, rm: RunningService) -> None:
        """Load the demo page from RedMessenger itself."""
        response = await self.page.goto(http_url(rm), wait_until="load")
        assert response is not None and response.ok, response

    async def start(self, url: str | None = None, setup: str | None = None, **options) -> None:
        """Import ``/client.js`` from the page's origin, make a client
        (``url`` None: the default, derived from the page's location),
        record its events, run ``setup`` (JS source of a function of the
        client and ``rm``, to add handlers) and connect."""
        await self.page.evaluate(START_CLIENT, {"url": url, "options": options, "setup": setup})

    async def wait(self, predicate: str, arg: Any = None, what: str = "") -> Any:
        """Poll ``predicate`` (a JS function of ``rm`` and ``arg``) in the
        page until it is truthy, within a deadline; return its value."""
        try:
            handle = await self.page.wait_for_function(
                f"([arg]) => {{ const rm = window.rm; return ({predicate})(rm, arg); }}",
                arg=[arg],
                polling=20,
                timeout=WAIT_MS,
            )
        except Exception as error:
            seen = await self.page.evaluate("JSON.stringify(window.rm ?? null)")
            raise AssertionError(
                f"the page did not see {what or predicate}: {error}\n"
                f"it saw: {seen}\nerrors: {self.problems}\n"
                f"console: {self.console}"
            ) from None
        return await handle.json_value()

    async def welcomed(self, count: int = 1) -> dict:
        """Wait for the ``count``-th welcome; return it."""
        return await self.wait(
            "(rm, n) => rm.welcomes.length >= n && rm.welcomes[n - 1]",
            count,
            f"welcome number {count}",
        )

    async def messages(self, count: int) -> list[dict]:
        """Wait until ``count`` messages were dispatched; return them all."""
        return await self.wait(
            "(rm, n) => rm.messages.length >= n && rm.messages", count, f"{count} messages"
        )

    async def recorded(self, name: str) -> Any:
        return await self.page.evaluate("(name) => window.rm[name]", name)

    async def evaluate(self, expression: str, arg: Any = None) -> Any:
        return await self.page.evaluate(expression, arg)


START_CLIENT = """async ({url, options, setup}) => {
  const { RedMessengerClient } = await import("/client.js");
  const rm = window.rm = {
    states: [], welcomes: [], messages: [], duplicates: [], errors: [], client: null,
  };
  const plain = (detail) => {
    const copy = { ...detail };
    if (copy.payloadBytes) copy.payloadBytes = Array.from(copy.payloadBytes);
    return copy;
  };
  if (options.keys) {  // a key function: a promise of each in turn, null
    const keys = options.keys;  // rejects, "never" never settles
    delete options.keys;
    rm.keyCalls = 0;
    options.key = async () => {
      const key = keys[Math.min(rm.keyCalls++, keys.length - 1)];
      if (key === null) throw new Error("no key yet");
      if (key === "never") await new Promise(() => {});
      return key;
    };
  }
  const client = new RedMessengerClient(url ?? undefined, options);
  rm.client = client;
  rm.url = client.url;
  client.addEventListener("state", (e) => rm.states.push({ ...e.detail, at: performance.now() }));
  client.addEventListener("welcome", (e) => rm.welcomes.push(e.detail));
  client.addEventListener("message", (e) => rm.messages.push(plain(e.detail)));
  client.addEventListener("duplicate", (e) => rm.duplicates.push(plain(e.detail)));
  client.addEventListener("error", (e) => rm.errors.push(e.detail));
  if (setup) (0, eval)(setup)(client, rm);
  client.connect();
}"""
