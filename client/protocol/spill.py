"""Messages larger than the server allows: which fields move to the object store, and back.

NATS refuses a message over its ``max_payload`` (1 MiB by default, configurable per server). A
task result or operation reply can outgrow it (a ``changes`` list of thousands of files, a large
``patch`` or answer text), and a refused publish must never turn into a lost or repeated task. So
the sender moves the largest of the :data:`SPILLABLE` fields to the object store, one by one,
until the message fits, and lists them in ``spilled`` (field name -> object name); the receiver
reads them back. Pure functions here; the I/O is the sender's and receiver's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["SPILLABLE", "SpillError", "encode", "restore", "spill"]

#: Fields that may move out of a message, in no particular order (the largest moves first).
SPILLABLE = ("changes", "patch", "result", "error")
#: Bytes kept free below ``max_payload`` for the headers and the ``spilled`` map itself.
HEADROOM = 4096


class SpillError(ValueError):
    """The message does not fit even with every spillable field moved out."""


def encode(payload: Mapping[str, Any]) -> bytes:
    """The compact JSON every message is sent as."""
    return json.dumps(payload, separators=(",", ":")).encode()


def spill(
    payload: Mapping[str, Any], *, limit: int, object_name: Callable[[str], str]
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Split ``payload`` into a message that fits in ``limit`` bytes and the objects to store.

    Returns ``(message, objects)``: ``objects`` maps object names (from ``object_name(field)``) to
    the JSON of each moved field; ``message["spilled"]`` maps each moved field to its object name.
    Nothing moves when the payload already fits. Raises :class:`SpillError` when it cannot fit.
    """
    message = dict(payload)
    objects: dict[str, bytes] = {}
    budget = max(limit - HEADROOM, 0)
    sizes = {name: len(encode({name: message[name]})) for name in SPILLABLE if message.get(name) is not None}
    while len(encode(message)) > budget:
        if not sizes:
            raise SpillError(f"message of {len(encode(message))} bytes does not fit in {limit} even when spilled")
        name = max(sizes, key=sizes.__getitem__)
        del sizes[name]
        target = object_name(name)
        objects[target] = encode({"value": message.pop(name)})
        message["spilled"] = {**message.get("spilled", {}), name: target}
    return message, objects


def restore(message: Mapping[str, Any], objects: Mapping[str, bytes | None]) -> dict[str, Any]:
    """Put spilled fields back into ``message`` from ``objects`` (object name -> stored bytes, as
    read by the receiver for every name in ``message["spilled"]``). A missing object leaves its
    field out and keeps it listed in ``spilled``."""
    restored = dict(message)
    missing: dict[str, str] = {}
    for name, target in (message.get("spilled") or {}).items():
        data = objects.get(target)
        if data is None:
            missing[name] = target
            continue
        restored[name] = json.loads(data)["value"]
    if missing:
        restored["spilled"] = missing
    else:
        restored.pop("spilled", None)
    return restored
