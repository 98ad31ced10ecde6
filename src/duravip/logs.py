"""Logging set-up: one event a line on stderr, plain or JSON.

Every module logs through ``logging.getLogger("duravip.<subsystem>")``; extra
fields passed with ``extra={"fields": {...}}`` are rendered as ``key=value``
pairs (or JSON keys), so a line stays greppable and machine-readable.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class _Formatter(logging.Formatter):
    def __init__(self, node: str, as_json: bool) -> None:
        super().__init__()
        self.node = node
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        if self.as_json:
            obj: dict[str, Any] = {
                "ts": round(record.created, 6),
                "level": record.levelname.lower(),
                "node": self.node,
                "logger": record.name,
                "msg": record.getMessage(),
                **{k: _jsonable(v) for k, v in fields.items()},
            }
            if record.exc_info:
                obj["exc"] = self.formatException(record.exc_info)
            return json.dumps(obj, separators=(",", ":"))
        ts = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        line = f"{ts} {record.levelname:<7} {self.node} {record.name}: {record.getMessage()}{extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _jsonable(v: Any) -> Any:
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    if isinstance(v, list | tuple | set | frozenset):
        return [_jsonable(x) for x in v]
    return str(v)


def setup(node: str, *, as_json: bool = False, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(node, as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
