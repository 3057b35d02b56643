"""Which directory instances OpenCode holds, which are in use, and disposing the idle ones.

OpenCode loads one instance per ``?directory=`` (config, tools, file watcher: ~100 MiB each) and
never unloads it by itself. A directory is *in use* from :meth:`DirectoryTracker.hold` (a task
opened a session there) until :meth:`release`, and while a run is in progress; only directories not
in use for ``idle_seconds`` are disposed. A later call about a disposed directory simply loads it
again, and its sessions are intact (they live in OpenCode's database, not in the instance).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


def dir_key(directory: os.PathLike[str] | str) -> str:
    """The ``?directory=`` string for a directory: absolute and normalised, but not resolved
    through symlinks (OpenCode keys instances by the exact string)."""
    return os.path.normpath(os.path.abspath(os.fspath(directory)))


@dataclass
class _Dir:
    holders: int = 0  # hold() calls not yet released
    running: int = 0  # runs in progress
    last_used: float = field(default_factory=time.monotonic)
    loaded: bool = False  # whether OpenCode probably holds an instance for it
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: What was registered on the instance with ``POST /mcp`` (lost with the instance).
    tools: object | None = None

    def unload(self) -> None:
        self.loaded = False
        self.tools = None

    def disposable(self, idle_seconds: float) -> bool:
        return (
            self.loaded and not self.holders and not self.running and time.monotonic() - self.last_used >= idle_seconds
        )


class DirectoryTracker:
    """Bookkeeping of directory use; :meth:`dispose_idle` unloads idle instances."""

    def __init__(self, idle_seconds: float) -> None:
        self.idle_seconds = idle_seconds
        self._dirs: dict[str, _Dir] = {}
        self.disposed: collections.deque[str] = collections.deque(maxlen=256)  # recent, for logs/tests

    def _get(self, key: str) -> _Dir:
        return self._dirs.setdefault(key, _Dir())

    async def hold(self, key: str) -> None:
        """Mark ``key`` in use until :meth:`release` (waits for a dispose in progress)."""
        state = self._get(key)
        async with state.lock:
            state.holders += 1
            state.last_used = time.monotonic()
            state.loaded = True

    def release(self, key: str) -> None:
        state = self._dirs.get(key)
        if state is not None:
            state.holders = max(0, state.holders - 1)
            state.last_used = time.monotonic()

    def in_use(self, key: str) -> bool:
        """Whether a task holds ``key`` or a run is in progress there."""
        state = self._dirs.get(key)
        return state is not None and bool(state.holders or state.running)

    @asynccontextmanager
    async def running(self, key: str) -> AsyncIterator[None]:
        """Mark ``key`` in use for the duration of a run."""
        state = self._get(key)
        async with state.lock:
            state.running += 1
            state.loaded = True
        try:
            yield
        finally:
            state.running -= 1
            state.last_used = time.monotonic()

    def tools(self, key: str) -> object | None:
        """What :meth:`set_tools` recorded for ``key``'s current instance (``None`` once it was
        disposed or the server restarted: the registration went with the instance)."""
        state = self._dirs.get(key)
        return state.tools if state is not None else None

    def set_tools(self, key: str, tools: object | None) -> None:
        self._get(key).tools = tools

    def forget_instances(self) -> None:
        """The server restarted: it holds no instance any more."""
        for state in self._dirs.values():
            state.unload()

    def instance_disposed(self, key: str) -> None:
        """Someone disposed ``key`` (a ``server.instance.disposed`` event)."""
        state = self._dirs.get(key)
        if state is not None and not state.running:
            state.unload()

    async def dispose_idle(self, dispose: Callable[[str], Awaitable[object]]) -> list[str]:
        """Call ``dispose(key)`` for every loaded directory not in use for ``idle_seconds``."""
        done: list[str] = []
        for key, state in list(self._dirs.items()):
            if not state.disposable(self.idle_seconds):
                continue
            async with state.lock:  # a run starting now waits until the dispose is over
                if not state.disposable(self.idle_seconds):
                    continue
                try:
                    await dispose(key)
                except Exception as exc:
                    log.warning("OpenCode dispose of %s failed: %s", key, exc)
                    continue
                state.unload()
            log.info("OpenCode instance of %s disposed after %.0fs idle", key, self.idle_seconds)
            self.disposed.append(key)
            done.append(key)
        # Forget unloaded, unused directories. No await between the check and the pop, and a free
        # lock has no waiters, so nobody can be holding on to the entry.
        for key, state in list(self._dirs.items()):
            if not (state.loaded or state.holders or state.running or state.lock.locked()):
                del self._dirs[key]
        return done

    async def reap_forever(self, dispose: Callable[[str], Awaitable[object]]) -> None:
        """Run :meth:`dispose_idle` periodically (a background task)."""
        interval = min(30.0, max(0.05, self.idle_seconds / 2))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.dispose_idle(dispose)
            except Exception:
                log.exception("OpenCode idle reaper failed")
