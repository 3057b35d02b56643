"""Small helpers over NATS KV: JSON values and key listings (key rules are in :mod:`.protocol.keys`)."""

from __future__ import annotations

import json
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue


def json_object(raw: bytes | None) -> dict[str, Any] | None:
    """A stored value as a JSON object; ``None`` when absent, empty, not JSON or not an object."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deep for the parser
        return None
    return value if isinstance(value, dict) else None


async def get_json(kv: KeyValue, key: str) -> dict[str, Any] | None:
    """The JSON object stored under ``key``, or ``None`` (see :func:`json_object`)."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    return json_object(entry.value if entry is not None else None)


async def list_keys(js: JetStreamContext, bucket: str) -> list[str]:
    """The keys of a KV bucket, read from its stream's per-subject state.

    Not ``KeyValue.keys()``: its watcher can signal "no more keys" before it has processed the
    messages already delivered, so a full bucket intermittently reads as empty (nats.py#842).
    A key whose last entry is a delete marker is still listed: ``get`` reports it absent.
    """
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    return sorted(subject[len(prefix) :] for subject in info.state.subjects or {})
