"""``--log-format json``: one JSON object per line, for log shippers. Each
event keeps its structured fields next to the rendered message."""

from __future__ import annotations

import json
import sys
from typing import IO

from twisted.logger import FileLogObserver, ILogObserver, formatEvent

#: twistd's own bookkeeping fields, not worth shipping.
_SKIP = {"log_format", "log_logger", "log_source", "log_io", "log_legacy", "log_trace",
         "log_flattened", "message", "format", "time", "system", "isError", "log_system",
         "log_failure", "failure", "why", "log_time", "log_level", "log_namespace",
         "log_text"}


def format_json(event: dict) -> str:
    record = {
        "time": event.get("log_time"),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key not in _SKIP and not key.startswith("_"):
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                value = repr(value)
            record[key] = value
    return json.dumps(record) + "\n"


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """An observer factory for twistd's ``--logger``."""
    return FileLogObserver(out or sys.stdout, format_json)
