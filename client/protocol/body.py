"""Reading a message body from the network: bounded, strict UTF-8 JSON, one object.

A task is hostile input. Its body is checked before anything else looks at it, so that a huge,
deeply nested or badly encoded body becomes a clear error (an error result when its callback can
still be read, else a dead letter) instead of a crash and a redelivery loop.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_DEPTH", "BodyError", "nesting_depth", "read_json_object"]

#: Deepest nesting of objects and arrays accepted (a task needs 3).
MAX_DEPTH = 32


class BodyError(ValueError):
    """The body is not one UTF-8 JSON object within the limits; the message says why.

    ``value`` is the parsed object when the body is JSON but refused anyway (too deep): its
    callback may still be read, so the task can be answered rather than dead-lettered.
    """

    def __init__(self, message: str, value: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.value = value


def nesting_depth(value: Any, limit: int) -> int:
    """Nesting depth of ``value`` (a scalar is 0), counting no further than ``limit + 1``."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 0)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            todo.extend((child, depth) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def read_json_object(data: bytes, *, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The JSON object in ``data``; raises :class:`BodyError` when it is not strict UTF-8, not
    JSON, not an object, nested deeper than ``max_depth`` or holding unencodable text (lone
    surrogates). The size limit is the caller's: it may still want the callback of a big task."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise BodyError(f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise BodyError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BodyError(f"must be a JSON object, not {type(value).__name__}")
    if nesting_depth(value, max_depth) > max_depth:
        raise BodyError(f"nested deeper than {max_depth} levels", value)
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BodyError("holds text that is not valid Unicode (a lone surrogate escape)") from None
    return value
