"""Logging: one JSON object per line (for log shippers), or a readable console line under `gateway dev`.

GATEWAY_LOG_LEVEL sets the level (default INFO) and GATEWAY_LOG_FORMAT the format (json, console).
Call sites pass structured fields with `extra=`: event_id, integration, attempt, status, error,
outcome, latency_ms, alert; the JSON line carries them as fields of their own.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import orjson

FIELDS = (
    "event_id",
    "integration",
    "attempt",
    "status",
    "error",
    "outcome",
    "latency_ms",
    "alert",
    "replay_id",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                data[name] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


def configure(default_format: str = "json") -> None:
    level = os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler()
    if (os.environ.get("GATEWAY_LOG_FORMAT") or default_format) == "console":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
