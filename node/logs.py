"""Structured logs: one line per event, each naming the node and, if any, the connection.

``configure_logging`` installs one handler on the root logger. Every record it writes
carries the node id (``set_node_id`` once the hub exists, since the id is made by the
Hub) and the connection id of records logged with ``extra={"conn_id": ...}``.

- ``text``: ``2025-01-02 03:04:05,678 INFO roomcast.node node=n1 conn=n1.2a message``
- ``json``: ``{"ts": "2025-01-02T03:04:05.678Z", "level": "INFO", "logger": "roomcast.node",
  "msg": "...", "node": "n1", "conn": "n1.2a"}`` plus ``"exc"`` with the traceback if any.

Newlines inside a message or a traceback are escaped, so one event is always one line
(and a client cannot forge log lines through a value that ends up in a message).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Final, Literal, TextIO

LogFormat = Literal["text", "json"]
FORMATS: Final = ("text", "json")
_HANDLER_NAME: Final = "roomcast"


class _NodeContext(logging.Filter):
    """Adds ``node`` and ``conn`` attributes to every record the handler writes."""

    def __init__(self, node_id: str | None) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node_id
        conn = getattr(record, "conn_id", None)
        record.conn = str(conn) if conn is not None else None
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger node=... [conn=...] message`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{self.formatTime(record)} {record.levelname} {record.name} "
            f"node={getattr(record, 'node', None) or '-'}"
        )
        conn = getattr(record, "conn", None)
        if conn:
            line += f" conn={conn}"
        line += f" {record.getMessage()}"
        exc = _exception_text(self, record)
        if exc:
            line += f" | {exc}"
        return _one_line(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, node, conn and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "node": getattr(record, "node", None),
            "conn": getattr(record, "conn", None),
        }
        exc = _exception_text(self, record)
        if exc:
            entry["exc"] = exc
        # json.dumps escapes newlines inside strings: always one line.
        return json.dumps(entry, default=str)


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    parts = []
    if record.exc_info:
        parts.append(formatter.formatException(record.exc_info))
    elif record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(formatter.formatStack(record.stack_info))
    return "\n".join(parts)


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


_context = _NodeContext(None)


class _QuietProbes(logging.Filter):
    """Drop access-log lines of /healthz, /readyz and /metrics: probes every few seconds."""

    # The path as aiohttp's default format (``"GET /readyz HTTP/1.1"``) and roomcast's
    # ``RedactingAccessLogger`` (``"GET /readyz"``) write it, with or without a query.
    _PROBE = re.compile(r' /(?:healthz|readyz|metrics)(?:[ ?"]|$)')

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "aiohttp.access":
            return True
        return self._PROBE.search(record.getMessage()) is None


_quiet_probes = _QuietProbes()


def set_node_id(node_id: str | None) -> None:
    """Name this node in every record from now on (call it once the Hub exists)."""
    _context.node_id = node_id


def configure_logging(
    level: str = "INFO",
    fmt: LogFormat | str = "text",
    node_id: str | None = None,
    *,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Log ``level`` and above to ``stream`` (stderr) as ``fmt`` lines; returns the handler.

    Calling it again replaces the handler it installed before, not other handlers.
    ValueError for an unknown level or format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    name = level.upper()
    if name not in logging.getLevelNamesMapping():
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_context)
    handler.addFilter(_quiet_probes)
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(name)
    set_node_id(node_id)
    return handler

