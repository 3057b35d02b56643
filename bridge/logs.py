"""Logging set-up for the sidecar (every record passes through the redaction layer), and
:func:`logged_suppress` for the failures that must not stop the work but must not vanish either."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator

from .redact import RedactingFilter, Redactor


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry)


def setup_logging(redactor: Redactor, level: str = "INFO", fmt: str = "text") -> None:
    """Send logs to stderr, redacted. Safe to call more than once."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter(redactor))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
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
