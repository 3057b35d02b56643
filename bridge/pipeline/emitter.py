"""Live stream events for one task: numbering, coalescing of text deltas, redaction, publishing."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ocbridge.bridge.redact import Redactor
from ocbridge.client.protocol import EventType, StreamEvent, ToolInfo, iso_now

log = logging.getLogger(__name__)

#: ``publish(subject, data)``: NATS for the sidecar, a callback for in-process backends.
Publish = Callable[[str, bytes], Awaitable[None]]

_MAX_BUFFER = 4096  # characters of text held back at most before a flush


class EventEmitter:
    """Publishes a task's events on its stream subject with ``seq`` 1, 2, 3...

    ``text`` and ``thinking`` arrive as many small deltas; publishing each one would flood NATS
    and the consumer, so they are buffered and flushed every ``flush_interval`` seconds, when the
    buffer grows large, or before any other event (which keeps Station's ordering).
    """

    def __init__(
        self, publish: Publish, subject: str, task_id: str, redactor: Redactor, *, flush_interval: float = 0.1
    ) -> None:
        self._publish_raw = publish
        self._subject = subject
        self._task_id = task_id
        self._redactor = redactor
        self._flush_interval = flush_interval
        self._seq = 0
        self._buffer_kind: str | None = None
        self._buffer: list[str] = []
        self._buffer_len = 0
        self._flusher: asyncio.TimerHandle | None = None
        self.tool_calls = 0

    @property
    def count(self) -> int:
        """Number of events published so far (the last ``seq``)."""
        return self._seq

    async def emit(self, type_: EventType | str, **fields: Any) -> None:
        """Publish one event now (after any buffered text)."""
        await self.flush()
        await self._publish(str(type_), fields)

    async def delta(self, kind: EventType, text: str) -> None:
        """Buffer a ``text`` or ``thinking`` delta."""
        if not text:
            return
        if self._buffer_kind not in (None, kind):
            await self.flush()
        if self._buffer_kind is None:
            self._buffer_kind = kind
            if self._flush_interval > 0:
                loop = asyncio.get_running_loop()
                self._flusher = loop.call_later(self._flush_interval, self._flush_soon)
        self._buffer.append(text)
        self._buffer_len += len(text)
        if self._flush_interval <= 0 or self._buffer_len >= _MAX_BUFFER:
            await self.flush()

    async def tool(self, type_: EventType, tool: ToolInfo) -> None:
        if type_ == EventType.TOOL_START:
            self.tool_calls += 1
        await self.emit(type_, tool=tool)

    def _flush_soon(self) -> None:
        self._flusher = None
        task = asyncio.ensure_future(self.flush())
        task.add_done_callback(_log_failure)

    async def flush(self) -> None:
        """Publish buffered text as one event."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._buffer_kind is None:
            return
        kind, content = self._buffer_kind, "".join(self._buffer)
        self._buffer_kind, self._buffer, self._buffer_len = None, [], 0
        await self._publish(kind, {"content": content})

    async def _publish(self, type_: str, fields: dict[str, Any]) -> None:
        self._seq += 1
        event = StreamEvent(taskID=self._task_id, seq=self._seq, timestamp=iso_now(), type=type_, **fields)
        payload = self._redactor.data(event.to_dict())
        await self._publish_raw(self._subject, json.dumps(payload, separators=(",", ":")).encode())


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("failed to flush text events: %s", task.exception())
