"""Session state (key = session name), as Station reads it from the sessions KV bucket."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from ocbridge.bridge.redact import Redactor
from ocbridge.client.protocol import SessionGit, SessionState, iso_now

from .leases import Lease, SessionLeases
from .stores import KeyValueStore, get_json

if TYPE_CHECKING:
    from ocbridge.bridge.engines.base import Engine


class SessionStore:
    """Reads and writes :class:`SessionState`; serialises work on one session with a lease
    (across every sidecar sharing ``leases``' store; within this process when none is given)."""

    def __init__(self, store: KeyValueStore, redactor: Redactor, leases: SessionLeases | None = None) -> None:
        self._store = store
        self._redactor = redactor
        self.leases = leases or SessionLeases()

    def lease(
        self, name: str, *, owner: str, on_lost: Callable[[], None] | None = None
    ) -> AbstractAsyncContextManager[Lease]:
        """Held while a task or an operation works in the session: one at a time per session.
        Waits while another holds it; ``on_lost`` is called if the lease is lost while held."""
        return self.leases.hold(name, owner=owner, on_lost=on_lost)

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

    async def open_or_continue(
        self,
        engine: Engine,
        *,
        name: str,
        workspace_name: str,
        path: Path,
        title: str | None = None,
        reuse: bool = True,
        git: SessionGit | None = None,
    ) -> tuple[SessionState, bool]:
        """Continue session ``name`` when the engine still knows it in this workspace, else open a
        new one; record it and return ``(state, reused)``.

        A continued session keeps its creation time, message count and git facts (``git`` given
        here wins); a new one starts from zero. ``reuse=False`` always opens a new session. The
        stored title is ``title`` or the previous one; the engine gets ``title`` or the name.
        """
        previous = await self.get(name) if reuse else None
        existing = None
        # Another engine's session id means nothing to this one (the sidecar switched engines).
        same_engine = previous is not None and previous.engine in (None, engine.name)
        if previous is not None and same_engine and Path(previous.workspace_path) == path:
            existing = previous.opencode_id or None
        handle = await engine.open_session(path, title or name, existing)
        # Same id means same session, even when an engine reports it as just created (a session
        # opened by the ``open`` operation counts as continued before its first prompt).
        reused = previous is not None and (not handle.created or handle.id == previous.opencode_id)
        carried = previous if reused else None
        state = SessionState(
            sessionName=name,
            opencodeID=handle.id,
            workspaceName=workspace_name,
            workspacePath=str(path),
            created=carried.created if carried else iso_now(),
            lastUsed=iso_now(),
            messageCount=carried.message_count if carried else 0,
            git=git or (carried.git if carried else None),
            engine=engine.name,
            title=title or (previous.title if previous else None),
        )
        await self.put(state)
        return state, reused

    async def delete(self, name: str) -> None:
        await self._store.delete(name)

    async def all(self) -> list[SessionState]:
        states = [await self.get(name) for name in await self._store.keys()]
        return sorted((s for s in states if s), key=lambda s: s.last_used, reverse=True)
