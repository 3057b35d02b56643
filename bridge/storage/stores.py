"""Where the pipeline keeps state and files: NATS KV and object store, or plain folders.

The sidecar uses the NATS implementations (Station reads the same buckets); the in-process
backends (:mod:`ocbridge.bridge.inprocess`) use the folder ones, so one pipeline serves both.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from ocbridge.client.kv import json_object, list_keys
from ocbridge.client.protocol import kv_key, kv_name


class KeyValueStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def put(self, key: str, value: bytes) -> None: ...
    async def delete(self, key: str) -> None: ...
    async def keys(self) -> list[str]: ...


class ArtifactStore(Protocol):
    async def put(self, name: str, data: bytes) -> None: ...
    async def get(self, name: str) -> bytes | None: ...


async def get_json(store: KeyValueStore, key: str) -> dict[str, Any] | None:
    """The JSON object stored under ``key``, or ``None`` when absent or not an object."""
    return json_object(await store.get(key))


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
        path = self._path(key)
        tmp = path.with_name(path.name + ".tmp")
        await asyncio.to_thread(tmp.write_bytes, value)
        os.replace(tmp, path)  # atomic: a reader never sees half a value

    async def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    async def keys(self) -> list[str]:
        return [unquote(p.name[: -len(".json")]) for p in self.folder.iterdir() if p.name.endswith(".json")]


class FolderArtifacts:
    """Objects as files under a folder (names may contain ``/``), confined to it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder.resolve()

    def _path(self, name: str) -> Path:
        path = (self.folder / name).resolve()
        if self.folder not in path.parents:
            raise ValueError(f"object name {name!r} escapes the store")
        return path

    async def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(path.write_bytes, data)

    async def get(self, name: str) -> bytes | None:
        try:
            return await asyncio.to_thread(self._path(name).read_bytes)
        except FileNotFoundError:
            return None
