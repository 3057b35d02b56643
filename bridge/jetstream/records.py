"""Task records in the tasks bucket: who runs a task, how often it ran, and its result.

The record is what makes "exactly one result" survive crashes: the result is stored here (state
``publishing``) *before* it is published, so a redelivered copy re-publishes it instead of running
the agent again, and a duplicate publish of the same ``taskID`` gets the same result.
"""

from __future__ import annotations

import json
import logging

from nats.js.kv import KeyValue
from pydantic import ValidationError

from ocbridge.bridge.redact import Redactor
from ocbridge.client.kv import get_json
from ocbridge.client.protocol import TaskRecord, record_key

log = logging.getLogger(__name__)


class TaskRecords:
    """Reads and writes :class:`TaskRecord` s (redacted) in the tasks bucket."""

    def __init__(self, kv: KeyValue, redactor: Redactor, sidecar_id: str) -> None:
        self._kv = kv
        self._redactor = redactor
        self.sidecar_id = sidecar_id

    async def get(self, task_id: str) -> TaskRecord | None:
        """The task's record; ``None`` when there is none or it cannot be read (logged)."""
        data = await get_json(self._kv, record_key(task_id))
        if data is None:
            return None
        try:
            return TaskRecord.model_validate(data)
        except ValidationError as exc:
            log.warning("task %s: ignoring an unreadable task record (%s)", task_id, exc.error_count())
            return None

    async def put(self, record: TaskRecord) -> None:
        """Store ``record`` as this sidecar's."""
        record.sidecar = self.sidecar_id
        payload = self._redactor.data(record.to_dict())
        await self._kv.put(record_key(record.task_id), json.dumps(payload).encode())
