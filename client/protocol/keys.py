"""KV key rules: any name becomes a key NATS accepts, and the keys of task and cancel records."""

from __future__ import annotations

import base64
import re

__all__ = ["cancel_key", "kv_key", "kv_name", "record_key"]

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


def record_key(task_id: str) -> str:
    """Key of a task's record in the tasks bucket."""
    return "task." + kv_key(task_id)


def cancel_key(task_id: str) -> str:
    """Key a client writes to cancel a task that no sidecar has picked up yet."""
    return "cancel." + kv_key(task_id)
