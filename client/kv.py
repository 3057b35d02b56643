"""Small helpers over NATS KV: key encoding and JSON values."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

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


async def list_keys(kv: KeyValue) -> list[str]:
    try:
        return list(await kv.keys())
    except Exception as exc:  # nats-py raises NoKeysError on an empty bucket
        if exc.__class__.__name__ == "NoKeysError":
            return []
        raise
