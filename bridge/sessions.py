"""Session state in the sessions KV bucket (key = session name), as Station reads it."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

from nats.js.kv import KeyValue

from client.kv import get_json, kv_key, kv_name, list_keys
from client.protocol import SessionState

from .redact import Redactor


class SessionStore:
    """Reads and writes :class:`SessionState`; serialises work on one session within a sidecar."""

    def __init__(self, kv: KeyValue, redactor: Redactor) -> None:
        self._kv = kv
        self._redactor = redactor
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def lock(self, name: str) -> asyncio.Lock:
        """A lock held while a task runs in the session: one prompt at a time per session."""
        return self._locks[name]

    async def get(self, name: str) -> SessionState | None:
        data = await get_json(self._kv, kv_key(name))
        if data is None:
            return None
        try:
            return SessionState.model_validate(data)
        except ValueError:
            return None  # a foreign or corrupt value: treat as absent, it will be overwritten

    async def put(self, state: SessionState) -> None:
        payload = self._redactor.data(state.to_dict())
        await self._kv.put(kv_key(state.session_name), json.dumps(payload).encode())

    async def delete(self, name: str) -> None:
        await self._kv.delete(kv_key(name))

    async def names(self) -> list[str]:
        return [kv_name(k) for k in await list_keys(self._kv)]
