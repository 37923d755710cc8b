"""The ``redmessenger`` command line, run as a subprocess as a user runs it,
against a test's Redis."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

#: Seconds one command line may take (it starts a Python, Twisted and txredisapi).
CLI_TIMEOUT = 60.0
CLI = [sys.executable, "-m", "redmessenger.cli"]


def cli(
    redis_url: str, *args: str, stdin: bytes | None = None, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run one command line, away from the repository (so the installed
    package runs), with REDMESSENGER_REDIS pointing at ``redis_url``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REDMESSENGER_")}
    environment.update(REDMESSENGER_REDIS=redis_url, **env)
    result = subprocess.run(
        [*CLI, *args],
        input=stdin,
        capture_output=True,
        env=environment,
        cwd=cwd or tempfile.gettempdir(),
        timeout=CLI_TIMEOUT,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


async def cli_async(redis_url: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """``cli`` from a coroutine: in a thread, so the reactor keeps serving."""
    return await asyncio.get_running_loop().run_in_executor(
        None, functools.partial(cli, redis_url, *args, **kwargs)
    )


def queue(redis, uid: str, prefix: str = "rm") -> list[dict]:
    """The user's stored queue, decoded."""
    return [
        json.loads(raw) for raw in redis.command("LRANGE", f"{prefix}:users:{uid}:messages", 0, -1)
    ]


def ok(result: subprocess.CompletedProcess) -> str:
    """What a command line that must succeed printed."""
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout
