"""Session state (key = session name), as Station reads it from the sessions KV bucket."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

from ocbridge.bridge.redact import Redactor
from ocbridge.client.protocol.models import SessionState

from .stores import KeyValueStore, get_json


class SessionStore:
    """Reads and writes :class:`SessionState`; serialises work on one session within a process."""

    def __init__(self, store: KeyValueStore, redactor: Redactor) -> None:
        self._store = store
        self._redactor = redactor
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def lock(self, name: str) -> asyncio.Lock:
        """Held while a task or an operation works in the session: one at a time per session."""
        return self._locks[name]

    async def get(self, name: str) -> SessionState | None:
        data = await get_json(self._store, name)
        if data is None:
            return None
        try:
            return SessionState.model_validate(data)
        except ValueError:
            return None  # a foreign or corrupt value: treat as absent, it will be overwritten

    async def put(self, state: SessionState) -> None:
        payload = self._redactor.data(state.to_dict())
        await self._store.put(state.session_name, json.dumps(payload).encode())

    async def delete(self, name: str) -> None:
        await self._store.delete(name)

    async def all(self) -> list[SessionState]:
        states = [await self.get(name) for name in await self._store.keys()]
        return sorted((s for s in states if s), key=lambda s: s.last_used, reverse=True)
