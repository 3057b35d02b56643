"""One task or workspace operation at a time per session, across every sidecar: a lease in KV.

How it works (any :class:`~.stores.KeyValueStore` with the atomic operations):

- **Acquire**: ``create`` the key (the value names the holder, the owner and the TTL). If it exists,
  wait: poll the key (from 20 ms up to ``poll`` seconds apart); a release in this process wakes
  its waiters at once. The caller bounds the wait (the task's deadline, its cancel).
- **Refresh**: while held, the holder rewrites the key every ``ttl / 3`` seconds (``update`` with
  its last revision), so a live lease changes revision well within its TTL.
- **Expiry, without comparing clocks**: a waiter that sees the *same revision* for ``ttl`` seconds
  (measured on its own monotonic clock) takes the lease over with ``update`` on that revision; only
  one waiter can win. In the sidecar the lease bucket's ``max_age`` is the TTL as well, so NATS
  removes a lease nobody refreshed even when nobody waits for it.
- **Abandoned**: a lease records its holder's process (:mod:`.liveness`); a holder on the same
  host and pid namespace whose process is gone (SIGKILL, a crash) is taken over at once. So is a
  lease of this very holder that nothing in this process holds: a ``create`` whose reply was lost
  (NATS restarting) left it behind.
- **Lost**: a refresh that finds another revision (taken over, or expired on the server), or no
  successful refresh for ``ttl`` seconds, means another holder may run now: ``on_lost`` is called
  and the holder must stop its work.
- **Release**: ``delete_if`` on the holder's revision (a lease taken over meanwhile is left alone).

Stores: a dedicated NATS KV bucket in the sidecar (see :data:`LEASE_BUCKET_SETTINGS`), a folder
(:class:`~.stores.FolderKeyValue`, file locks: several processes may share it) or memory
(:class:`MemoryKeyValue`, one process) in-process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from ocbridge.bridge.logs import logged_suppress

from .liveness import process_identity, provably_dead
from .stores import KeyValueStore, RevisionMismatch

log = logging.getLogger(__name__)

#: ``(holder, key)`` of the leases this process holds or is creating right now, with a count (two
#: copies of one task may try at once). A lease of ours in the store that is not counted here was
#: left behind by an attempt whose reply was lost.
_IN_USE: collections.Counter[tuple[str, str]] = collections.Counter()

#: Seconds a lease lives without a refresh (a holder that died frees its session after this).
DEFAULT_TTL = 30.0

#: What the sidecar's lease bucket needs: one value per key, ``max_age`` = the lease TTL (seconds)
#: (``js.create_key_value(bucket=..., history=1, ttl=DEFAULT_TTL)``; file storage).
LEASE_BUCKET_SETTINGS = {"history": 1, "ttl": DEFAULT_TTL}


def default_holder() -> str:
    """A name for this process in lease values (host, pid, random): for logs and operators."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass(eq=False)
class Lease:
    """A held lease. ``lost`` is set when it can no longer be trusted to exclude others."""

    key: str
    owner: str
    value: bytes
    revision: int
    lost: asyncio.Event = field(default_factory=asyncio.Event)


class SessionLeases:
    """Leases on keys of ``store`` (session names): ``async with leases.hold(name, owner=...)``."""

    def __init__(
        self,
        store: KeyValueStore | None = None,
        *,
        ttl: float = DEFAULT_TTL,
        holder: str | None = None,
        poll: float = 0.5,
    ) -> None:
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        self.store: KeyValueStore = store if store is not None else MemoryKeyValue()
        self.ttl = ttl
        self.holder = holder or default_holder()
        self._poll = max(min(poll, ttl / 4), 0.01)
        self._released: dict[str, set[asyncio.Event]] = {}

    @contextlib.asynccontextmanager
    async def hold(
        self, key: str, *, owner: str, on_lost: Callable[[], None] | None = None
    ) -> AsyncIterator[Lease]:
        """Wait for the lease on ``key`` (unbounded: cancel to stop waiting), hold it while the block
        runs, release it at the end. ``on_lost`` is called if the lease is lost meanwhile.

        ``owner`` names the work and must be unique to it: a lease found held under the same
        owner is an earlier run of that work and is taken back at once."""
        lease = await self._acquire(key, owner)
        async with self._holding(lease, on_lost):
            yield lease

    @contextlib.asynccontextmanager
    async def try_hold(
        self, key: str, *, owner: str, on_lost: Callable[[], None] | None = None,
        details: Mapping[str, str] | None = None,
    ) -> AsyncIterator[Lease | None]:
        """Like :meth:`hold`, but never waits: yields ``None`` when someone else holds ``key``.
        ``details`` are kept in the lease's value for whoever finds it abandoned.

        In a store whose keys expire with the lease TTL (the sidecar's lease bucket), an existing
        key means its holder refreshed it within the TTL: it is alive, or died moments ago.
        """
        mark = (self.holder, key)
        if _IN_USE[mark]:  # held here already (another copy of the same work)
            yield None
            return
        value = self._value(owner, details)
        lease = await self._create(key, owner, value)
        if lease is None:
            lease = await self._take_abandoned(key, owner, value, await self.store.entry(key))
            if lease is None:
                yield None
                return
        async with self._holding(lease, on_lost):
            yield lease

    async def _create(self, key: str, owner: str, value: bytes) -> Lease | None:
        """``create`` the key; ``None`` when it exists. Counted in use from before the call, so that
        a create whose reply is lost is never mistaken for an abandoned lease while it runs."""
        revision = await self._counted(key, self.store.create(key, value))
        return Lease(key, owner, value, revision) if revision is not None else None

    async def _take_abandoned(
        self, key: str, owner: str, value: bytes, current: tuple[bytes, int] | None
    ) -> Lease | None:
        """Take ``key`` (``current``: its value and revision) over when its holder's process is
        provably gone, or when it is this holder's own and nothing here holds it; ``None`` otherwise."""
        if current is None:
            return None
        mark = (self.holder, key)
        ours = (_field(current[0], "holder") == self.holder and _field(current[0], "process") == process_identity()
                and not _IN_USE[mark])
        if not ours and not provably_dead(_field(current[0], "process")):
            return None
        if (revision := await self._update(key, value, current[1])) is None:
            return None  # changed meanwhile: refreshed, released or taken by another waiter
        why = "left behind by an attempt of its own" if ours else "its holder is no longer running"
        log.warning("%s took over the lease on %r (%s): %s", owner, key, _describe(current[0]), why)
        return Lease(key, owner, value, revision)

    @contextlib.asynccontextmanager
    async def _holding(self, lease: Lease, on_lost: Callable[[], None] | None) -> AsyncIterator[Lease]:
        stopping = asyncio.Event()
        refresher = asyncio.create_task(self._refresh(lease, stopping, on_lost), name=f"lease-{lease.key}")
        try:
            yield lease
        finally:
            stopping.set()
            await asyncio.wait({refresher})
            try:
                if not lease.lost.is_set():
                    await self._release(lease)
            finally:
                _forget((self.holder, lease.key))

    def _value(self, owner: str, details: Mapping[str, str] | None = None) -> bytes:
        return json.dumps({
            **(details or {}), "holder": self.holder, "owner": owner, "ttl": self.ttl, "since": time.time(),
            "token": secrets.token_hex(8), "process": process_identity(),
        }).encode()

    async def _acquire(self, key: str, owner: str) -> Lease:
        value = self._value(owner)
        seen: tuple[int, float] | None = None  # (revision, when first seen at it)
        delay = 0.02
        while True:
            if (created := await self._create(key, owner, value)) is not None:
                return created
            current = await self.store.entry(key)
            if current is None:
                continue  # released (or expired) meanwhile: try again at once
            if (taken := await self._take_abandoned(key, owner, value, current)) is not None:
                return taken
            if _owner(current[0]) == owner:
                # Held by an earlier run of the same owner (a task whose sidecar died: only one
                # copy of a task runs at a time, so that run is gone): take it back at once
                # instead of waiting out the TTL.
                if (revision := await self._update(key, value, current[1])) is None:
                    continue
                log.info("%s took back the lease on %r from its own earlier run", owner, key)
                return Lease(key, owner, value, revision)
            now = time.monotonic()
            if seen is None or seen[0] != current[1]:
                if seen is None:
                    log.info("%s waits for the lease on %r held by %s", owner, key, _describe(current[0]))
                seen = (current[1], now)
            elif now - seen[1] >= self.ttl:
                if (revision := await self._update(key, value, current[1])) is None:
                    seen = None
                    continue
                log.warning("%s took over the lease on %r: %s did not refresh it for %.0fs",
                            owner, key, _describe(current[0]), self.ttl)
                return Lease(key, owner, value, revision)
            await self._wait_release(key, delay)
            delay = min(delay * 2, self._poll)

    async def _update(self, key: str, value: bytes, revision: int) -> int | None:
        """Take ``key`` over at ``revision`` (counted in use); ``None`` when it changed meanwhile."""
        return await self._counted(key, self.store.update(key, value, revision))

    async def _counted(self, key: str, write: Awaitable[int]) -> int | None:
        """Run a conditional ``write`` of ``key`` counted in use (kept when it succeeds: the caller
        then holds the lease); ``None`` when the key was not as expected."""
        mark = (self.holder, key)
        _IN_USE[mark] += 1
        try:
            return await write
        except RevisionMismatch:
            _forget(mark)
            return None
        except BaseException:
            _forget(mark)
            raise

    async def _wait_release(self, key: str, delay: float) -> None:
        released = asyncio.Event()
        waiters = self._released.setdefault(key, set())
        waiters.add(released)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(released.wait(), delay)
        finally:
            waiters.discard(released)
            if not waiters:
                self._released.pop(key, None)

    async def _refresh(self, lease: Lease, stopping: asyncio.Event, on_lost: Callable[[], None] | None) -> None:
        last_ok = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.ttl / 3)
                return
            try:
                lease.revision = await self.store.update(lease.key, lease.value, lease.revision)
                last_ok = time.monotonic()
                continue
            except RevisionMismatch:
                if await self._still_mine(lease):  # an earlier refresh landed but its reply was lost
                    continue
                log.error("the lease on %r held by %s was taken over: stopping its work", lease.key, lease.owner)
            except Exception as exc:
                if time.monotonic() - last_ok < self.ttl:
                    log.warning("refreshing the lease on %r failed (will retry): %s", lease.key, exc)
                    continue
                log.error("the lease on %r could not be refreshed for %.0fs: stopping its work (%s)",
                          lease.key, self.ttl, exc)
            lease.lost.set()
            if on_lost is not None:
                on_lost()
            return

    async def _release(self, lease: Lease) -> None:
        with logged_suppress(f"releasing the lease on {lease.key!r} (it expires by itself)", log):
            try:
                await asyncio.wait_for(self.store.delete_if(lease.key, lease.revision), max(self.ttl, 5.0))
            except RevisionMismatch:
                if await self._still_mine(lease):
                    await asyncio.wait_for(self.store.delete_if(lease.key, lease.revision), max(self.ttl, 5.0))
                else:
                    log.warning("the lease on %r was taken over before %s released it", lease.key, lease.owner)
        for released in self._released.get(lease.key, ()):
            released.set()


    async def _still_mine(self, lease: Lease) -> bool:
        """Whether the key still holds this lease's value (unique per acquisition); if so, adopt
        its current revision."""
        current = await self.store.entry(lease.key)
        if current is None or current[0] != lease.value:
            return False
        lease.revision = current[1]
        return True


def _forget(mark: tuple[str, str]) -> None:
    _IN_USE[mark] -= 1
    if _IN_USE[mark] <= 0:
        del _IN_USE[mark]


def _field(value: bytes, name: str) -> object:
    try:
        return json.loads(value).get(name)
    except (ValueError, AttributeError, RecursionError):
        return None


def abandoned(value: bytes) -> dict[str, object] | None:
    """The contents of a lease value whose holder's process is provably gone, else ``None``."""
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and provably_dead(data.get("process")) else None


def _owner(value: bytes) -> str | None:
    owner = _field(value, "owner")
    return owner if isinstance(owner, str) else None


def _describe(value: bytes) -> str:
    try:
        data = json.loads(value)
        return f"{data.get('owner')} on {data.get('holder')}"
    except (ValueError, AttributeError, RecursionError):
        return "another holder"


class MemoryKeyValue:
    """A :class:`~.stores.KeyValueStore` in memory, for leases within one process (the default
    when no shared store is given)."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, int]] = {}
        self._revision = 0

    def _next(self) -> int:
        self._revision += 1
        return self._revision

    async def get(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        return entry[0] if entry else None

    async def put(self, key: str, value: bytes) -> None:
        self._data[key] = (value, self._next())

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def keys(self) -> list[str]:
        return list(self._data)

    async def entry(self, key: str) -> tuple[bytes, int] | None:
        return self._data.get(key)

    async def create(self, key: str, value: bytes) -> int:
        if key in self._data:
            raise RevisionMismatch(f"key {key!r} exists")
        self._data[key] = (value, revision := self._next())
        return revision

    async def update(self, key: str, value: bytes, revision: int) -> int:
        self._check(key, revision)
        self._data[key] = (value, new := self._next())
        return new

    async def delete_if(self, key: str, revision: int) -> None:
        self._check(key, revision)
        del self._data[key]

    def _check(self, key: str, revision: int) -> None:
        entry = self._data.get(key)
        if entry is None or entry[1] != revision:
            raise RevisionMismatch(f"key {key!r} is no longer at revision {revision}")
