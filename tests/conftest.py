"""Fixtures shared by the whole suite (the helpers they use are modules of
their own: :mod:`redisservers`, :mod:`resp`, :mod:`network`,
:mod:`certificates`, :mod:`harness`).

Redis: every test that needs one gets a real redis-server
(:class:`redisservers.RedisServerProcess`) on a free port of 127.0.0.1.

- ``redis``: the session's shared server, flushed before each test.
- ``private_redis``: a server of the test's own, for tests that stop, kill
  or restart Redis.
- ``redis_factory``: starts more servers of the test's own, set up as asked.
- ``resp_client``: makes a :class:`resp.RespClient` for any port, to look at
  a Redis that a test started some other way.

Keep this module free of module-level imports of redmessenger (and of
anything that imports ``twisted.internet.reactor``, such as txredisapi):
pytest imports it *before* pytest-twisted installs the reactor named by
``--reactor`` (setup.cfg: asyncio), so such an import would install the
default reactor first and pytest would stop with an INTERNALERROR.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from certificates import make_certificate
from network import pick_free_port
from redisservers import RedisServerProcess, TlsRedis, spawned_redis, tls_redis_server
from resp import RespClient


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("soak", "the soak test (tests/test_soak.py), larger by hand")
    group.addoption("--soak-clients", type=int, default=1000, help="concurrent clients")
    group.addoption("--soak-seconds", type=float, default=20.0,
                    help="how long clients churn and messages flow")
    group.addoption("--soak-rate", type=float, default=150.0, help="messages sent per second")
    group.addoption("--soak-seed", type=int, default=1, help="random seed")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerProcess]:
    """The session's shared redis-server. Tests want ``redis`` instead,
    which hands it over running and empty."""
    server = RedisServerProcess(tmp_path_factory.mktemp("redis"), appendonly=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis(redis_server: RedisServerProcess) -> RedisServerProcess:
    """The shared redis-server, running (even if an earlier test stopped
    it) and flushed."""
    if not redis_server.running:
        redis_server.start()
    redis_server.flushall()
    return redis_server


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., RedisServerProcess]]:
    """Starts redis-servers of this test's own:
    ``redis_factory(data_dir, appendonly=False)``; all are stopped after
    the test."""
    servers: list[RedisServerProcess] = []

    def start(data_dir: Path, *, appendonly: bool = False) -> RedisServerProcess:
        server = RedisServerProcess(data_dir, appendonly=appendonly)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def private_redis(tmp_path: Path,
                  redis_factory: Callable[..., RedisServerProcess]) -> RedisServerProcess:
    """A redis-server of this test's own, with an append-only file so that
    what it holds survives ``stop()`` and ``start()``."""
    return redis_factory(tmp_path / "private-redis", appendonly=True)


@pytest.fixture
def resp_client() -> Callable[[int], RespClient]:
    """Makes a :class:`RespClient` for a Redis on a given port."""
    return RespClient


#: The modules of the end-to-end guarantees (docs/guarantees.rst): each of
#: their tests of a running service (``messenger``) runs twice, with the
#: service alone and as a node beside another that stores for offline users,
#: so that they hold in a cluster too. A test of what the storing node does
#: itself (``@pytest.mark.alone``) runs alone only.
IN_A_CLUSTER_TOO = {"test_delivery_e2e", "test_protocol_e2e", "test_outages",
                    "test_backpressure", "test_inbox", "test_inbox_errors", "test_publish",
                    "test_crash", "test_dead_letters", "test_redis_errors_e2e",
                    "test_hostile_input", "test_limits", "test_security", "test_redis_oom"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "messenger" not in metafunc.fixturenames:
        return
    if metafunc.module.__name__ in IN_A_CLUSTER_TOO and \
            metafunc.definition.get_closest_marker("alone") is None:
        metafunc.parametrize("messenger", ["alone", "beside a storer"], indirect=True)


@pytest.fixture
def messenger(request: pytest.FixtureRequest,
              redis: RedisServerProcess) -> Iterator[Callable[..., Any]]:
    """Starts RedMessengerServices in the test's reactor against ``redis``:
    ``rm = await messenger(**settings)`` (see tests/harness.py); all are
    stopped after the test. Parametrized indirectly with ``"beside a
    storer"``, each is a node of a cluster whose first node, started before
    it with the same settings, stores for every offline user: the node a
    test talks to then follows its users on their own channels, and waits
    for the storer's fence to drain them (docs/scaling.rst)."""
    from harness import run, start_service

    started = []
    beside_a_storer = getattr(request, "param", "alone") == "beside a storer"

    async def start(**settings):
        if beside_a_storer:
            started.append(await start_service(redis, **settings))
        service = await start_service(redis, **settings)
        service.beside_a_storer = beside_a_storer
        started.append(service)
        return service

    try:
        yield start
    finally:
        for service in reversed(started):
            service.drop_clients()
            run(service.stop())


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every twisted.logger event emitted during the test, as text."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event):
        text = formatEvent(event)
        if event.get("log_failure") is not None:
            text += " | " + event["log_failure"].getErrorMessage()
        lines.append(text)

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (key, cert) PEM files."""
    return make_certificate(tmp_path)


@pytest.fixture
def free_port() -> int:
    """A port of 127.0.0.1 that was free when the test started."""
    return pick_free_port()


@pytest.fixture
def oom_redis(tmp_path, redis_factory):
    """A redis-server of the test's own, with ``out_of_memory(True)`` to
    fill it past ``maxmemory`` (noeviction) and ``out_of_memory(False)``
    to free it."""
    server = redis_factory(tmp_path / "oom-redis")
    server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")

    def out_of_memory(on: bool) -> None:
        if on:
            server.command("SETRANGE", "ballast", 4 * 1024 * 1024, "x")
            server.command("CONFIG", "SET", "maxmemory", 1024 * 1024)
        else:
            server.command("CONFIG", "SET", "maxmemory", 0)

    server.out_of_memory = out_of_memory
    return server


@pytest.fixture
def tls_redis(tmp_path, certificate):
    """A redis-server of the test's own that speaks only TLS, with the
    ``certificate`` fixture's certificate (skipped without a redis-server
    built with TLS, unless REDMESSENGER_REQUIRE_TLS_REDIS=1)."""
    from redmessenger.settings import RedisAddress

    executable = tls_redis_server()
    if executable is None:
        if os.environ.get("REDMESSENGER_REQUIRE_TLS_REDIS") == "1":
            pytest.fail("no redis-server built with TLS on PATH (apt-get install redis-server)")
        pytest.skip("no redis-server built with TLS on PATH (apt-get install redis-server)")
    key, cert = certificate
    port = pick_free_port()
    redis = TlsRedis(port, cert)
    with spawned_redis([executable, "--port", "0", "--tls-port", str(port),
                        "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
                        "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                        "--tls-auth-clients", "no", "--dir", str(tmp_path), "--save", "",
                        "--appendonly", "no"], lambda: redis.command("PING")):
        # A CA bundle: some other CA first, then the one that signed Redis's.
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(make_certificate(tmp_path, "other", "Another CA")[1].read_bytes()
                           + cert.read_bytes())
        redis.address = RedisAddress.from_url(f"rediss://127.0.0.1:{port}/0?ca={bundle}")
        yield redis


# One browser for the module, a fresh context (no shared storage, no shared
# sockets) for each test; both closed afterwards.


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the test module, closed after it (skipped
    without Playwright or Chromium: see :func:`chromium.missing`)."""
    from chromium import CHROMIUM_ARGS, find_chromium, missing
    from harness import run

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


@pytest.fixture
def tabs(browser) -> Iterator[Any]:
    """``tab = await tabs()``: a page in a fresh browser context; every
    context is closed after the test (which closes its sockets)."""
    from chromium import Tab
    from harness import run

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
