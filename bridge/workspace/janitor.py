"""Workspace lifetimes: cleanup policies, scopes and the sweeper for abandoned workspaces.

Policies: ``on_success`` deletes an agent-scoped workspace after a task that completed;
``on_session_end`` deletes it when its session is closed; ``manual`` never deletes it. A
``workflow``-scoped workspace outlives its tasks and sessions until the workflow closes it.
Independently, the sweeper deletes workspaces nobody used for ``workspace_max_age``.

Each workspace has a record in a key-value store (the state bucket for the sidecar, so several
sidecars sharing a volume agree), keyed by its path. Records are read leniently (unknown keys are
ignored, an unreadable record counts as absent), and a deletion only ever happens under the root,
whatever a record says (:func:`~.paths.remove_tree`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ocbridge.bridge.storage.stores import KeyValueStore, get_json
from ocbridge.client.protocol import CleanupPolicy, Scope

from .paths import WorkspaceError, remove_tree

log = logging.getLogger(__name__)

_PREFIX = "ocbridge.workspace."

#: A workspace used again within this many seconds with the same policy and scope is not
#: written again: its record's ``last_used`` lags by at most this much (the sweeper counts days).
TOUCH_INTERVAL = 30.0
_RECENT_MAX = 1024  # records remembered for that, least recently used first out


class WorkspaceRecord(BaseModel):
    """What the janitor keeps about one workspace. Keys it does not know (written by a newer sidecar
    or another tool) are ignored, never an error."""

    model_config = ConfigDict(extra="ignore")

    path: str
    policy: CleanupPolicy = "manual"
    scope: Scope = "agent"
    scope_id: str | None = None
    last_used: float = Field(default_factory=time.time)


def _parse(key: str, data: dict[str, Any] | None) -> WorkspaceRecord | None:
    """The record stored under ``key``; an unreadable one is logged and counts as absent (it is
    overwritten at the next use of the workspace)."""
    if data is None:
        return None
    try:
        return WorkspaceRecord.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in exc.errors())
        log.warning("ignoring the unreadable workspace record %s (%s)", key, problems)
        return None


class WorkspaceJanitor:
    """Applies cleanup policies and sweeps old workspaces. Never deletes outside ``root``."""

    def __init__(
        self, store: KeyValueStore, root: Path, default_policy: CleanupPolicy = "manual",
        *, touch_interval: float = TOUCH_INTERVAL, on_delete: Callable[[Path], None] | None = None,
    ) -> None:
        """``on_delete`` is called with each deleted workspace's path (its git mirrors go too)."""
        self._store = store
        self._on_delete = on_delete
        self._root = root.resolve()
        self.default_policy = default_policy
        self.touch_interval = touch_interval
        self._in_use: dict[str, int] = {}
        #: path -> (the record this process last wrote, monotonic time of the write).
        self._recent: OrderedDict[str, tuple[WorkspaceRecord, float]] = OrderedDict()

    # ------------------------------------------------------------------------------ bookkeeping

    async def record(self, path: Path) -> WorkspaceRecord | None:
        key = _PREFIX + str(path)
        return _parse(key, await get_json(self._store, key))

    async def touch(
        self,
        path: Path,
        *,
        policy: CleanupPolicy | None = None,
        scope: Scope | None = None,
        scope_id: str | None = None,
        at: float | None = None,
    ) -> WorkspaceRecord:
        """Note that ``path`` is in use now (or ``at``, a Unix time); policy and scope stick once given.

        Each task touches its workspace: a record this process wrote less than ``touch_interval``
        ago, which the call would not change but for ``last_used``, is not read and written again
        (two KV requests per task saved).
        """
        key = str(path)
        recent = self._fresh(key)
        if (at is None and recent is not None and (policy or recent.policy) == recent.policy
                and (scope or recent.scope) == recent.scope and (scope_id or recent.scope_id) == recent.scope_id):
            return recent.model_copy()
        record = await self.record(path) or WorkspaceRecord(path=key, policy=self.default_policy)
        record.path = key
        record.policy = policy or record.policy
        record.scope = scope or record.scope
        record.scope_id = scope_id or record.scope_id
        record.last_used = time.time() if at is None else at
        await self._store.put(_PREFIX + key, record.model_dump_json().encode())
        self._remember(key, record)
        return record

    def _fresh(self, key: str) -> WorkspaceRecord | None:
        """The record this process wrote for ``key`` within ``touch_interval``, if any."""
        entry = self._recent.get(key)
        if entry is None or time.monotonic() - entry[1] >= self.touch_interval:
            return None
        self._recent.move_to_end(key)
        return entry[0]

    def _remember(self, key: str, record: WorkspaceRecord) -> None:
        self._recent[key] = (record.model_copy(), time.monotonic())
        self._recent.move_to_end(key)
        while len(self._recent) > _RECENT_MAX:
            self._recent.popitem(last=False)

    @contextlib.contextmanager
    def using(self, path: Path):
        """Marks a workspace busy so the sweeper leaves it alone."""
        key = str(path)
        self._in_use[key] = self._in_use.get(key, 0) + 1
        try:
            yield
        finally:
            self._in_use[key] -= 1
            if not self._in_use[key]:
                del self._in_use[key]

    # ----------------------------------------------------------------------------- the policies

    async def after_task(self, path: Path, completed: bool) -> bool:
        """``on_success``: delete an agent-scoped workspace after a completed task."""
        record = self._fresh(str(path)) or await self.record(path)
        if record and record.policy == "on_success" and record.scope == "agent" and completed:
            return await self.delete(path)
        return False

    async def on_close(self, path: Path, success: bool = True) -> bool:
        """Closing a session (or a workflow): ``on_session_end`` always deletes, ``on_success`` only
        when the work succeeded, ``manual`` never."""
        record = await self.record(path)
        policy = record.policy if record else self.default_policy
        if policy == "on_session_end" or (policy == "on_success" and success):
            return await self.delete(path)
        return False

    async def delete(self, path: Path) -> bool:
        """Delete a workspace folder and its record (refuses anything outside the root, symlinks
        included: the deletion never follows a link out of it)."""
        path = Path(path)
        if str(path) in self._in_use:
            return False
        failures: list[str] = []

        def on_error(where: str, exc: BaseException) -> None:
            failures.append(f"{where}: {exc}")

        try:
            await asyncio.to_thread(remove_tree, self._root, path, on_error)
        except WorkspaceError as exc:
            log.error("refusing to delete %s: %s", path, exc)
            return False
        except OSError as exc:
            log.error("could not delete workspace %s: %s", path, exc)
            return False
        if failures:
            log.warning("deleting workspace %s: %d entr%s could not be removed (first: %s)", path, len(failures),
                        "y" if len(failures) == 1 else "ies", failures[0])
        self._recent.pop(str(path), None)
        if self._on_delete is not None:
            await asyncio.to_thread(self._on_delete, path)
        await self._store.delete(_PREFIX + str(path))
        log.info("deleted workspace %s", path)
        return True

    async def sweep(self, max_age: float) -> list[str]:
        """Delete workspaces unused for ``max_age`` seconds; returns their paths."""
        removed = []
        now = time.time()
        for key in await self._store.keys():
            if not key.startswith(_PREFIX):
                continue
            record = _parse(key, await get_json(self._store, key))
            if record is None or now - record.last_used < max_age:
                continue
            if record.scope == "workflow" and record.policy == "manual":
                continue  # a manual workflow workspace is the operator's to remove
            # The key names the workspace (the record's own ``path`` is informative only).
            path = key[len(_PREFIX):]
            if await self.delete(Path(path)):
                removed.append(path)
        return removed

    async def sweep_forever(self, max_age: float, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                removed = await self.sweep(max_age)
                if removed:
                    log.info("sweeper removed %d abandoned workspace(s)", len(removed))
            except Exception as exc:  # a bad record must not stop the sweeper
                log.warning("workspace sweep failed: %s", exc)
