"""The embedded redis-server's data directory: who may read it, the password
kept in it, and which server version it is for.

Plain file operations, no reactor, so that the embedded service and the
``redmessenger`` command (which finds the password here) share them.

- The directory is 0700 and everything in it 0600 (0700 for directories):
  the append-only file holds every stored message and user key.
- ``redis-password`` (0600) is the server's password, made at first start.
- ``redis-server.json`` (0600) records the newest server version that has
  opened the directory and the port it last listened on: an older server
  would not read what a newer one wrote (Redis 7's ``appendonlydir/``) and
  would start empty, hiding the data.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

__all__ = ["PASSWORD_FILE", "STATE_FILE", "DataDirError", "embedded_password", "password",
           "record", "recorded_version", "secure"]

PASSWORD_FILE = "redis-password"
STATE_FILE = "redis-server.json"

#: Redis 7 keeps its append-only files in this directory; older ones cannot.
_REDIS_7_AOF_DIR = "appendonlydir"


class DataDirError(Exception):
    """The data directory cannot be used, and why."""


def secure(data_dir: Path) -> None:
    """Create ``data_dir`` if needed and make it and what it holds private
    to this user (a directory made by an earlier version was 0755)."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data_dir.chmod(0o700)
        for root, dirs, files in os.walk(data_dir):
            for name in dirs:
                _chmod(Path(root, name), 0o700)
            for name in files:
                _chmod(Path(root, name), 0o600)
    except OSError as e:
        raise DataDirError(f"cannot make the data directory {data_dir} private: {e}") from None


def _chmod(path: Path, mode: int) -> None:
    if not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) != mode:
        path.chmod(mode)


def password(data_dir: Path) -> str:
    """The server's password: read from ``redis-password``, or made (and
    written 0600) if there is none yet."""
    path = data_dir / PASSWORD_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_password(path)
    except OSError as e:
        raise DataDirError(f"cannot write the Redis password {path}: {e}") from None
    made = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as file:
        file.write(made + "\n")
    return made


def _read_password(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise DataDirError(f"cannot read the Redis password {path}: {e}") from None
    if not text or any(c.isspace() or c in "\"'\\" for c in text):
        raise DataDirError(f"{path} does not hold a usable password (one word, no quotes): "
                           "delete it to have a new one made")
    return text


def recorded_version(data_dir: Path) -> tuple[int, ...] | None:
    """The newest server version known to have opened ``data_dir``; for a
    directory from before the record, Redis 7 if its files are Redis 7's."""
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
        return tuple(int(part) for part in state["version"].split("."))
    except FileNotFoundError:
        return (7, 0, 0) if (data_dir / _REDIS_7_AOF_DIR).is_dir() else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataDirError(f"cannot read {data_dir / STATE_FILE}: {e}") from None


def record(data_dir: Path, version: tuple[int, ...], port: int) -> None:
    """Write down the version (never lowering it) and the port."""
    newest = max(version, recorded_version(data_dir) or version)
    path = data_dir / STATE_FILE
    partial = path.with_name(path.name + ".new")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump({"version": ".".join(map(str, newest)), "port": port}, file)
            file.write("\n")
        partial.replace(path)
    except OSError as e:
        raise DataDirError(f"cannot write {path}: {e}") from None


def embedded_password(data_dir: Path, port: int) -> str | None:
    """The password of the embedded server that ``data_dir`` last ran on
    ``port``, if this user may read it; ``None`` otherwise (another
    directory's server, or none)."""
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
        if state.get("port") != port:
            return None
        return (data_dir / PASSWORD_FILE).read_text().strip() or None
    except (OSError, ValueError, AttributeError):
        return None
