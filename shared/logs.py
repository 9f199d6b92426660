"""Logging for both processes: text for people, or JSON lines with request context.

Context (request id, tenant, session, turn, job) is bound per request or job in a
context variable, so every line logged while handling it carries those fields
without passing them around. Keys and tokens are never among them.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec

from shared.settings import Settings

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("log_context")


def bind(**fields: str | None) -> None:
    """Add fields to the current task's log context (None values are skipped)."""
    current = dict(_context.get({}))
    current.update({k: v for k, v in fields.items() if v})
    _context.set(current)


@contextlib.contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    token = _context.set({**_context.get({}), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_context.get({}),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(line).decode()


_TOKEN = re.compile(r"([?&]token=)[^&\s\"]+")


class RedactTokens(logging.Filter):
    """Stream URLs carry a token in their query string (`?token=`), and uvicorn's
    access log, when turned on, prints request lines: whatever a line says, a
    token in it is replaced before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg = _TOKEN.sub(r"\1[redacted]", message)
            record.args = None
        return True


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactTokens())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
