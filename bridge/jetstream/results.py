"""Publishing results and replies that always fit the server's ``max_payload``.

A message over ``max_payload`` is refused by NATS, and a refused result would mean a task run
again or a client waiting out its timeout. Large fields (the changes list, the patch, long text)
move to the object store first (:mod:`ocbridge.client.protocol.spill`); the message names them in
``spilled`` and the client reads them back. ``max_payload`` is the connected server's, read from
its INFO, never assumed.
"""

from __future__ import annotations

import logging
from typing import Any

from nats.aio.client import Client as NATS

from ocbridge.bridge.redact import Redactor
from ocbridge.bridge.storage.stores import ArtifactStore
from ocbridge.client.protocol import spill

log = logging.getLogger(__name__)

#: Seconds a publish may take to reach the server before the attempt counts as failed.
FLUSH_TIMEOUT = 5.0


class Publisher:
    """Encodes (redacted), spills when needed, publishes and flushes."""

    def __init__(self, nc: NATS, artifacts: ArtifactStore, redactor: Redactor) -> None:
        self._nc = nc
        self._artifacts = artifacts
        self._redactor = redactor

    @property
    def max_payload(self) -> int:
        """The connected server's limit (NATS' 1 MiB default before the first INFO)."""
        return int(getattr(self._nc, "max_payload", 0) or 1024 * 1024)

    async def encode(self, payload: dict[str, Any], *, object_prefix: str) -> bytes:
        """The redacted message for ``payload``; big fields go to ``<object_prefix>.<field>.json``."""
        message, objects = spill.spill(
            self._redactor.data(payload),
            limit=self.max_payload,
            object_name=lambda field: f"{object_prefix}.{field}.json",
        )
        for name, data in objects.items():
            await self._artifacts.put(name, data)
        if objects:
            log.info("message for %s spilled %s to the object store", object_prefix, sorted(message["spilled"]))
        return spill.encode(message)

    async def publish(self, subject: str, payload: dict[str, Any], *, object_prefix: str) -> None:
        """Publish ``payload`` on ``subject`` and wait until the server has it."""
        await self._nc.publish(subject, await self.encode(payload, object_prefix=object_prefix))
        await self._nc.flush(timeout=FLUSH_TIMEOUT)
