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

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from certificates import make_certificate
from network import pick_free_port
from redisservers import RedisServerProcess
from resp import RespClient


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("soak", "the soak test (tests/test_soak.py), larger by hand")
    group.addoption("--soak-clients", type=int, default=1000, help="concurrent clients")
    group.addoption("--soak-seconds", type=float, default=40.0,
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


@pytest.fixture
def messenger(redis: RedisServerProcess) -> Iterator[Callable[..., Any]]:
    """Starts RedMessengerServices in the test's reactor against ``redis``:
    ``rm = await messenger(**settings)`` (see tests/harness.py); all are
    stopped after the test."""
    from harness import run, start_service

    started = []

    async def start(**settings):
        service = await start_service(redis, **settings)
        started.append(service)
        return service

    try:
        yield start
    finally:
        for service in started:
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
