"""Logging for the sidecar: structured task fields, JSON or text, every record redacted; and
:func:`logged_suppress` for the failures that must not stop the work but must not vanish either.

While a task runs, every record (whatever logger emits it, in the task's asyncio task or the
tasks it starts) carries ``task_id``, ``session``, ``workspace``, ``attempt`` and, when a trace is
current, ``trace_id`` and ``span_id`` as fields: :func:`log_fields` sets them (the worker and the
pipeline do), :class:`TaskFieldsFilter` copies them onto the records, redacted like the message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import IO, Any

from .redact import RedactingFilter, Redactor

try:  # the sidecar depends on OpenTelemetry; the trace id is only a bonus for the logs
    from opentelemetry.trace import get_current_span
except ImportError:  # pragma: no cover - a bare install without the bridge extra
    get_current_span = None  # type: ignore[assignment]

__all__ = [
    "FIELDS", "JsonFormatter", "TaskFieldsFilter", "TextFormatter", "bind_log_fields", "current_log_fields",
    "log_fields", "logged_suppress", "setup_logging",
]

#: The structured fields, in the order the text format shows them.
FIELDS = ("task_id", "session", "workspace", "attempt", "trace_id", "span_id")

_NONE: Mapping[str, Any] = MappingProxyType({})
_fields: ContextVar[Mapping[str, Any]] = ContextVar("ocbridge_log_fields", default=_NONE)


@contextlib.contextmanager
def log_fields(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (``None`` values are left out) to every record logged inside the ``with``,
    in this asyncio task and the tasks it creates; nested calls add to the outer fields."""
    token = _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _fields.reset(token)


def bind_log_fields(**fields: Any) -> None:
    """Add ``fields`` for the rest of the current asyncio task (until an enclosing
    :func:`log_fields` ends): for a value learnt part-way, such as the attempt."""
    _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})


def current_log_fields() -> dict[str, Any]:
    """The fields :func:`log_fields` set for the current context (no trace ids)."""
    return dict(_fields.get())


class TaskFieldsFilter(logging.Filter):
    """Copies the current :func:`log_fields` and the current trace and span ids onto each record,
    string values redacted. A field passed with ``extra=`` is kept (and redacted too)."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            values = dict(_fields.get())
            if get_current_span is not None:
                context = get_current_span().get_span_context()
                if context.is_valid:
                    values["trace_id"] = format(context.trace_id, "032x")
                    values["span_id"] = format(context.span_id, "016x")
            for name in FIELDS:
                value = getattr(record, name, None)
                if value is None:
                    value = values.get(name)
                if value is not None:
                    setattr(record, name, self.redactor.text(value) if isinstance(value, str) else value)
        except Exception:  # a broken field must never drop the record
            pass
        return True


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {name: value for name in FIELDS if (value := getattr(record, name, None)) is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ms), ``level``, ``logger``, ``message``, the task
    fields that are set, ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_record_fields(record),
        }
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message`` with the task fields appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _record_fields(record)
        if not fields:
            return text
        line, newline, rest = text.partition("\n")  # fields on the first line, before a traceback
        shown = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) and (' ' in v or not v) else v}"
                         for k, v in fields.items())
        return f"{line}  [{shown}]{newline}{rest}"


def setup_logging(
    redactor: Redactor, level: str = "INFO", fmt: str = "auto", *, stream: IO[str] | None = None
) -> None:
    """Send logs to ``stream`` (stderr), redacted, with the task fields. ``fmt``: ``json``,
    ``text``, or ``auto`` (text on a terminal, JSON otherwise). Safe to call more than once."""
    stream = stream if stream is not None else sys.stderr
    if fmt == "auto":
        try:
            fmt = "text" if stream.isatty() else "json"
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            fmt = "json"
    handler = logging.StreamHandler(stream)
    handler.addFilter(TaskFieldsFilter(redactor))
    handler.addFilter(RedactingFilter(redactor))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_ocbridge", False)]:
        root.removeHandler(old)
    handler._ocbridge = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Quieten chatty libraries; their warnings still show.
    for name in ("nats", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def logged_suppress(what: str, logger: logging.Logger, *, level: int = logging.WARNING) -> Iterator[None]:
    """``contextlib.suppress(Exception)`` that logs the failure once: ``"<what> failed: <error>"``.

    For best-effort steps (a final flush, a cleanup, an unsubscribe) whose failure must not end the
    task but must be visible to an operator. The traceback is added at DEBUG level. Cancellation
    and ``KeyboardInterrupt``/``SystemExit`` are never swallowed.
    """
    try:
        yield
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        logger.log(level, "%s failed: %s", what, detail, exc_info=logger.isEnabledFor(logging.DEBUG))
