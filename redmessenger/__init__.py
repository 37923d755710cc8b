"""RedMessenger: a Redis PUBLISH to a user nobody is listening for is stored,
and delivered, in order, when the user connects.

The server's names are loaded on first use (PEP 562), so that an
application importing ``redmessenger.client`` or ``redmessenger.publish``
does not load the server, and Autobahn with it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .service import RedMessengerService
    from .settings import AuthMode, RedisAddress, Settings

__all__ = ["AuthMode", "RedMessengerService", "RedisAddress", "Settings", "__version__"]

#: Each lazily loaded name, and the module that defines it.
_HOMES = {
    "AuthMode": ".settings",
    "RedisAddress": ".settings",
    "Settings": ".settings",
    "RedMessengerService": ".service",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value  # the next look-up does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
