"""The environment variables of both command lines (``twistd redmessenger``
and ``redmessenger``): option ``--queue-max`` reads ``REDMESSENGER_QUEUE_MAX``,
as a default that the command line overrides. One naming rule and one way of
reading them, so that an operator's environment file means the same to both."""

from __future__ import annotations

import os


def variable(option: str) -> str:
    """The environment variable of ``--option``."""
    return "REDMESSENGER_" + option.upper().replace("-", "_")


def value(option: str, default: str | None = None) -> str | None:
    """What the environment says for ``--option`` (an empty variable says
    ""), else ``default``."""
    return os.environ.get(variable(option), default)
