"""What every wire model shares: camelCase aliases, unknown fields kept, compact JSON, timestamps.

Field names on the wire are Station's exact camelCase names. Python code uses snake_case attributes;
``populate_by_name`` lets both spellings construct a model. Unknown fields are accepted and kept
(``extra="allow"``) so a newer Station can add fields without breaking an older sidecar, and a
re-serialised message still carries them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints, ValidationError

__all__ = ["Name", "WireModel", "describe_validation_error", "iso_now"]


def _printable(value: str) -> str:
    # Names become paths, argv items, URL segments, KV keys and environment values: control
    # characters (NUL, newlines, escapes) have no business in any of them.
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("must not contain control characters")
    return value


#: A name from the wire (session, workspace, agent, model, file, branch, author): non-empty,
#: bounded, no control characters. Where it becomes a path or an argument it is checked again.
Name = Annotated[str, StringConstraints(min_length=1, max_length=4096), AfterValidator(_printable)]


def iso_now() -> str:
    """Current UTC time in Station's format, e.g. ``2026-01-02T10:11:12.345Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class WireModel(BaseModel):
    """Base for protocol messages: camelCase aliases, unknown fields kept, compact JSON output."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")

    def to_wire(self) -> bytes:
        """Serialise as Station does: aliases, no ``null`` for absent optional fields."""
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()

    def to_dict(self) -> dict[str, Any]:
        """The wire form as a ``dict`` (for printing and tests)."""
        return json.loads(self.to_wire())

    @classmethod
    def from_wire(cls, data: bytes | str | dict[str, Any]) -> Self:
        """Parse a wire message; raises :class:`pydantic.ValidationError` on bad input."""
        if isinstance(data, dict):
            return cls.model_validate(data)
        return cls.model_validate_json(data)


def describe_validation_error(exc: ValidationError) -> str:
    """``a.b: message; c: message``: every problem of a validation error, each naming its key."""
    return "; ".join(
        f"{'.'.join(str(part) for part in err['loc']) or '<root>'}: {err['msg']}"
        for err in exc.errors(include_url=False)
    )
