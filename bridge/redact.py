"""One redaction layer for everything that leaves the sidecar: events, results, KV, logs, errors.

It masks the secret values the sidecar knows about (registered at start-up and per task) and the
usual token shapes, so a token that reaches an output by an unforeseen path is still caught.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import Any

MASK = "***"

# Shapes of credentials worth masking even when nobody registered the value.
_PATTERNS = [
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}\b"),  # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}\b"),
    re.compile(r"\bglpat-[A-Za-z0-9_\-]{20,}\b"),  # GitLab
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),  # Slack
    re.compile(r"\bsk-(?:ant-)?[A-Za-z0-9_\-]{20,}\b"),  # OpenAI / Anthropic keys
    re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=\-]{8,}"),
    re.compile(r"(?i)(\bbasic\s+)[A-Za-z0-9+/=]{8,}"),
    # user:pass@ (or token@) in URLs: keep scheme and host.
    re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://)[^/\s:@]+(?::[^/\s@]*)?@"),
]

#: One scan that finds whether any shape may be present (most strings have none): the patterns
#: above as alternatives, their leading ``(?i)`` turned into a scoped group.
_ANY_SHAPE = re.compile("|".join(
    f"(?i:{p.pattern[4:]})" if p.pattern.startswith("(?i)") else f"(?:{p.pattern})" for p in _PATTERNS
))
#: Shorter strings can hold neither a registered secret (6 characters at least) nor a shape.
_SHORTEST = 6


class Redactor:
    """Masks registered secrets and known token shapes. Thread-safe; cheap when nothing matches."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: dict[str, int] = {}
        self._regex: re.Pattern[str] | None = None
        self._values: tuple[str, ...] = ()  # longest first
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        """Register a secret value (ignored when too short to be a credential)."""
        if not secret or len(secret) < 6:
            return
        with self._lock:
            self._secrets[secret] = self._secrets.get(secret, 0) + 1
            self._rebuild()

    def remove(self, secret: str | None) -> None:
        """Forget one registration of a per-task secret (values stay masked while still in use)."""
        if not secret:
            return
        with self._lock:
            count = self._secrets.get(secret, 0) - 1
            if count > 0:
                self._secrets[secret] = count
            else:
                self._secrets.pop(secret, None)
            self._rebuild()

    def _rebuild(self) -> None:
        values = sorted(self._secrets, key=len, reverse=True)
        self._regex = re.compile("|".join(re.escape(v) for v in values)) if values else None
        self._values = tuple(values)

    @property
    def longest_secret(self) -> int:
        """Length of the longest registered secret (0 when none)."""
        values = self._values
        return len(values[0]) if values else 0

    def split_stream(self, text: str) -> tuple[str, str]:
        """Split the text received so far of a stream published in pieces (live ``text`` deltas)
        into ``(ready, held)``: ``ready`` may be redacted and published now; ``held`` must wait for
        the next piece, or the end, because a secret may continue in it.

        ``held`` is the longest end of ``text`` that begins a registered secret (so at most
        :attr:`longest_secret` - 1 characters), moved back to the start of any secret or token
        shape that straddles the cut and of a token shape still running at the end. Whoever joins
        the published pieces (each redacted) never sees a registered secret. Token shapes are best
        effort: one not yet recognisable at the end of a piece can escape.
        """
        regex = self._regex
        hold = 0
        for secret in self._values:
            for size in range(min(len(secret) - 1, len(text)), hold, -1):
                if text.endswith(secret[:size]):
                    hold = size
                    break
        cut = len(text) - hold
        matches = [
            (match.start(), match.end(), pattern is not regex)
            for pattern in ([regex] if regex is not None else []) + _PATTERNS
            for match in pattern.finditer(text)
        ]
        moved = True
        while moved:  # holding more is always safe; the cut only moves back, so this ends
            moved = False
            for begin, end, shape in matches:
                if begin < cut and (cut < end or (shape and end == len(text))):
                    cut, moved = begin, True
        return text[:cut], text[cut:]

    def text(self, value: str) -> str:
        """Redact a string."""
        if len(value) < _SHORTEST:
            return value
        regex = self._regex
        if (regex is None or regex.search(value) is None) and _ANY_SHAPE.search(value) is None:
            return value
        if regex is not None:
            value = regex.sub(MASK, value)
        for pattern in _PATTERNS:
            if pattern.groups:
                value = pattern.sub(lambda m: m.group(1) + MASK + ("@" if m.group(0).endswith("@") else ""), value)
            else:
                value = pattern.sub(MASK, value)
        return value

    def data(self, value: Any) -> Any:
        """Redact every string inside nested dicts/lists (keys included)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(k) if isinstance(k, str) else k: self.data(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.data(v) for v in value]
        return value


class RedactingFilter(logging.Filter):
    """A logging filter that renders each record's message and redacts it (args included)."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not kill logging
            message = str(record.msg)
        record.msg = self.redactor.text(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            # Render the traceback now, redacted, so handlers never format the raw one.
            formatter = logging.Formatter()
            record.exc_text = self.redactor.text(formatter.formatException(record.exc_info))
            record.exc_info = None
        return True


#: The process-wide redactor: the sidecar registers its secrets here at start-up.
default_redactor = Redactor()
