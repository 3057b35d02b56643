"""Small helpers over NATS KV: key encoding and JSON values."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

_VALID_KEY = re.compile(r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$")


def kv_key(name: str) -> str:
    """A KV key for an arbitrary name: the name itself when valid (what Station reads), else encoded."""
    if _VALID_KEY.match(name) and not name.startswith("b64="):
        return name
    return "b64=" + base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def kv_name(key: str) -> str:
    """Inverse of :func:`kv_key`."""
    if key.startswith("b64="):
        raw = key[4:]
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    return key


async def get_json(kv: KeyValue, key: str) -> dict[str, Any] | None:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    if entry is None or not entry.value:
        return None
    try:
        value = json.loads(entry.value)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def list_keys(js: JetStreamContext, bucket: str) -> list[str]:
    """The keys of a KV bucket, read from its stream's per-subject state.

    Not ``KeyValue.keys()``: its watcher can signal "no more keys" before it has processed the
    messages already delivered, so a full bucket intermittently reads as empty (nats.py#842).
    A key whose last entry is a delete marker is still listed: ``get`` reports it absent.
    """
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    return sorted(subject[len(prefix) :] for subject in info.state.subjects or {})
