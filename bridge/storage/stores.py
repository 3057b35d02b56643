"""Where the pipeline keeps state and files: NATS KV and object store, or plain folders.

The sidecar uses the NATS implementations (Station reads the same buckets); the in-process
backends (:mod:`ocbridge.bridge.inprocess`) use the folder ones, so one pipeline serves both.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote

from nats.js import JetStreamContext
from nats.js.errors import (
    APIError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from ocbridge.client.kv import json_object, list_keys
from ocbridge.client.protocol import kv_key, kv_name


class RevisionMismatch(Exception):
    """A conditional write found another revision than the one expected (for ``create``: the key
    exists already). Nothing was written."""


class KeyValueStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def put(self, key: str, value: bytes) -> None: ...
    async def delete(self, key: str) -> None: ...
    async def keys(self) -> list[str]: ...

    # Atomic operations (what a lease needs, :mod:`.leases`). A key's revision is a positive number
    # that changes with every conditional write of it; they raise :class:`RevisionMismatch`.
    async def entry(self, key: str) -> tuple[bytes, int] | None:
        """The value and revision of ``key``, or ``None`` when absent."""
        ...

    async def create(self, key: str, value: bytes) -> int:
        """Write ``key`` only if it is absent; returns the new revision."""
        ...

    async def update(self, key: str, value: bytes, revision: int) -> int:
        """Write ``key`` only if its revision is still ``revision``; returns the new revision."""
        ...

    async def delete_if(self, key: str, revision: int) -> None:
        """Delete ``key`` only if its revision is still ``revision``."""
        ...


class ArtifactStore(Protocol):
    async def put(self, name: str, data: bytes) -> None: ...
    async def get(self, name: str) -> bytes | None: ...


async def get_json(store: KeyValueStore, key: str) -> dict[str, Any] | None:
    """The JSON object stored under ``key``, or ``None`` when absent or not an object."""
    return json_object(await store.get(key))


def _replace_file(path: Path, data: bytes) -> None:
    """Write ``path`` atomically: a reader never sees half a value, and concurrent writers of one
    path never share a temporary file (each gets its own in the same folder, then ``os.replace``).
    A symlink at ``path`` is replaced, never written through."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".", suffix=".tmp", delete=False) as handle:
        handle.write(data)
    try:
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


class NatsKeyValue:
    """A NATS KV bucket; keys are arbitrary names (encoded when NATS would refuse them)."""

    def __init__(self, js: JetStreamContext, bucket: str, kv: KeyValue) -> None:
        self.js = js
        self.bucket = bucket
        self.kv = kv

    async def get(self, key: str) -> bytes | None:
        try:
            entry = await self.kv.get(kv_key(key))
        except KeyNotFoundError:
            return None
        return entry.value if entry is not None else None

    async def put(self, key: str, value: bytes) -> None:
        await self.kv.put(kv_key(key), value)

    async def delete(self, key: str) -> None:
        await self.kv.delete(kv_key(key))

    async def keys(self) -> list[str]:
        return [kv_name(k) for k in await list_keys(self.js, self.bucket)]

    async def entry(self, key: str) -> tuple[bytes, int] | None:
        try:
            entry = await self.kv.get(kv_key(key))
        except KeyNotFoundError:
            return None
        return (entry.value or b"", entry.revision) if entry is not None and entry.revision else None

    async def create(self, key: str, value: bytes) -> int:
        try:
            return await self.kv.create(kv_key(key), value)
        except (KeyWrongLastSequenceError, KeyNotFoundError):  # exists (or vanished meanwhile: retry)
            raise RevisionMismatch(f"key {key!r} exists") from None

    async def update(self, key: str, value: bytes, revision: int) -> int:
        try:
            return await self.kv.update(kv_key(key), value, last=revision)
        except KeyWrongLastSequenceError:
            raise RevisionMismatch(f"key {key!r} is no longer at revision {revision}") from None

    async def delete_if(self, key: str, revision: int) -> None:
        try:
            await self.kv.delete(kv_key(key), last=revision)
        except APIError as exc:
            if exc.err_code in (10071, 10164):  # wrong last sequence
                raise RevisionMismatch(f"key {key!r} is no longer at revision {revision}") from None
            raise


class NatsArtifacts:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def put(self, name: str, data: bytes) -> None:
        await self.store.put(name, data)

    async def get(self, name: str) -> bytes | None:
        try:
            result = await self.store.get(name)
        except (ObjectNotFoundError, NotFoundError):
            return None
        return result.data


class FolderKeyValue:
    """Keys as files in a private folder (one JSON value each), for in-process backends."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, key: str) -> Path:
        # Percent-encoding keeps any key (``/`` included) a single, reversible file name.
        return self.folder / (quote(key, safe="") + ".json")

    async def get(self, key: str) -> bytes | None:
        try:
            return await asyncio.to_thread(self._path(key).read_bytes)
        except FileNotFoundError:
            return None

    async def put(self, key: str, value: bytes) -> None:
        await asyncio.to_thread(_replace_file, self._path(key), value)

    async def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    async def keys(self) -> list[str]:
        return [unquote(p.name[: -len(".json")]) for p in self.folder.iterdir() if p.name.endswith(".json")]

    # The atomic operations hold an exclusive file lock on ``<folder>/.lock`` (so they are atomic
    # across processes sharing the folder) and count revisions in ``<key>.rev``. A plain ``put``
    # is not counted: keys used with these operations (leases) are written only with them.

    async def entry(self, key: str) -> tuple[bytes, int] | None:
        return await asyncio.to_thread(self._locked, self._entry, key)

    async def create(self, key: str, value: bytes) -> int:
        return await asyncio.to_thread(self._locked, self._write_if, key, value, None)

    async def update(self, key: str, value: bytes, revision: int) -> int:
        return await asyncio.to_thread(self._locked, self._write_if, key, value, revision)

    async def delete_if(self, key: str, revision: int) -> None:
        await asyncio.to_thread(self._locked, self._delete_if, key, revision)

    def _locked(self, operation, *args):
        with _file_lock(self.folder / ".lock"):
            return operation(*args)

    def _rev_path(self, key: str) -> Path:
        return self.folder / (quote(key, safe="") + ".rev")

    def _revision(self, key: str) -> int:
        try:
            return int(self._rev_path(key).read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _entry(self, key: str) -> tuple[bytes, int] | None:
        try:
            value = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return value, max(self._revision(key), 1)

    def _write_if(self, key: str, value: bytes, expected: int | None) -> int:
        current = self._entry(key)
        if expected is None and current is not None:
            raise RevisionMismatch(f"key {key!r} exists")
        if expected is not None and (current is None or current[1] != expected):
            raise RevisionMismatch(f"key {key!r} is no longer at revision {expected}")
        revision = max(self._revision(key), current[1] if current else 0) + 1
        _replace_file(self._path(key), value)
        _replace_file(self._rev_path(key), str(revision).encode())
        return revision

    def _delete_if(self, key: str, revision: int) -> None:
        current = self._entry(key)
        if current is None or current[1] != revision:
            raise RevisionMismatch(f"key {key!r} is no longer at revision {revision}")
        _replace_file(self._rev_path(key), str(revision + 1).encode())  # revisions never repeat
        self._path(key).unlink()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (blocking: call it in a thread)."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class FolderArtifacts:
    """Objects as files under a folder (names may contain ``/``), confined to it: a name is mapped to
    its real path (``..`` and symlinks resolved) and refused unless that lies inside the folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder.resolve()

    def _path(self, name: str) -> Path:
        if not name or "\x00" in name:
            raise ValueError(f"object name {name!r} is empty or contains NUL")
        path = (self.folder / name).resolve()
        if self.folder not in path.parents:
            raise ValueError(f"object name {name!r} escapes the store")
        return path

    async def put(self, name: str, data: bytes) -> None:
        path = self._path(name)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _replace_file(path, data)

        await asyncio.to_thread(write)

    async def get(self, name: str) -> bytes | None:
        try:
            return await asyncio.to_thread(self._path(name).read_bytes)
        except FileNotFoundError:
            return None
