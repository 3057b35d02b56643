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

#: ``publish(subject, data)``: NATS for the sidecar, a callback for in-process backends. With
#: trace headers the emitter calls ``publish(subject, data, headers=...)`` (NATS' signature).
Publish = Callable[..., Awaitable[None]]

_MAX_BUFFER = 4096  # characters of text held back at most before a flush


class EventEmitter:
    """Publishes a task's events on its stream subject with ``seq`` 1, 2, 3... (and ``attempt``).

    ``text`` and ``thinking`` arrive as many small deltas; publishing each one would flood NATS
    and the consumer, so they are buffered and flushed every ``flush_interval`` seconds, when the
    buffer grows large, or before any other event (which keeps Station's ordering).

    Redaction is per event, so a secret the agent spells across two flushes would escape it: a
    flush publishes only what :meth:`Redactor.split_stream` says is ready, and keeps back the end
    that may begin a registered secret (a few characters, and only when the text really ends
    like one) until the next delta of the same kind or :meth:`aclose`. Such a tail can therefore
    arrive after a tool event; joined, the deltas are the same text, never with a secret in it.
    """

    def __init__(
        self,
        publish: Publish,
        subject: str,
        task_id: str,
        redactor: Redactor,
        *,
        flush_interval: float = 0.1,
        attempt: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """``headers``: NATS headers for every event (the task span's trace context), or none."""
        self._publish_raw = publish
        self._headers = headers or None
        self._subject = subject
        self._task_id = task_id
        self._redactor = redactor
        self._flush_interval = flush_interval
        self._attempt = attempt
        self._seq = 0
        self._buffer_kind: str | None = None
        self._buffer: list[str] = []
        self._buffer_len = 0
        #: Per kind, the end of the text not yet published because a secret may continue in it.
        self._held: dict[str, str] = {}
        self._flusher: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()  # timed flushes in flight (R15: kept, awaited)
        self._lock = asyncio.Lock()  # one publisher at a time, so seq order is publish order
        self.tool_calls = 0

    @property
    def count(self) -> int:
        """Number of events published so far (the last ``seq``)."""
        return self._seq

    async def emit(self, type_: EventType | str, **fields: Any) -> None:
        """Publish one event now (after any buffered text)."""
        async with self._lock:
            await self._flush_locked(final=False)
            await self._publish(str(type_), fields)

    async def delta(self, kind: EventType, text: str) -> None:
        """Buffer a ``text`` or ``thinking`` delta."""
        if not text:
            return
        async with self._lock:
            if self._buffer_kind not in (None, kind):
                await self._flush_locked(final=False)
            if self._buffer_kind is None:
                self._buffer_kind = kind
                held = self._held.pop(kind, "")
                self._buffer, self._buffer_len = ([held], len(held)) if held else ([], 0)
                if self._flush_interval > 0:
                    loop = asyncio.get_running_loop()
                    self._flusher = loop.call_later(self._flush_interval, self._flush_soon)
            self._buffer.append(text)
            self._buffer_len += len(text)
            if self._flush_interval <= 0 or self._buffer_len >= _MAX_BUFFER:
                await self._flush_locked(final=False)

    async def tool(self, type_: EventType, tool: ToolInfo) -> None:
        if type_ == EventType.TOOL_START:
            self.tool_calls += 1
        await self.emit(type_, tool=tool)

    def _flush_soon(self) -> None:
        self._flusher = None
        task = asyncio.ensure_future(self._timed_flush())
        self._flushes.add(task)
        task.add_done_callback(self._flush_done)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("failed to flush text events: %s", task.exception())

    async def _timed_flush(self) -> None:
        async with self._lock:
            await self._flush_locked(final=False)

    async def flush(self, *, final: bool = False) -> None:
        """Publish buffered text as one event, after any timed flush already under way. An end
        that may begin a secret is kept back unless ``final`` (the text is over)."""
        if self._flushes:
            await asyncio.wait(set(self._flushes))
        async with self._lock:
            await self._flush_locked(final=final)

    async def aclose(self) -> None:
        """The task is over: wait for timed flushes, then publish everything still buffered or held."""
        await self.flush(final=True)

    async def _flush_locked(self, *, final: bool) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._buffer_kind is not None:
            kind, text = self._buffer_kind, "".join(self._buffer)
            self._buffer_kind, self._buffer, self._buffer_len = None, [], 0
            ready, held = (text, "") if final else self._redactor.split_stream(text)
            if held:
                self._held[kind] = held
            if ready:
                await self._publish(kind, {"content": ready})
        if final:
            held_tails, self._held = self._held, {}
            for kind, text in held_tails.items():
                await self._publish(kind, {"content": text})

    async def _publish(self, type_: str, fields: dict[str, Any]) -> None:
        self._seq += 1
        event = StreamEvent(
            taskID=self._task_id, seq=self._seq, attempt=self._attempt, timestamp=iso_now(), type=type_, **fields
        )
        payload = self._redactor.data(event.to_dict())
        data = json.dumps(payload, separators=(",", ":")).encode()
        if self._headers is None:
            await self._publish_raw(self._subject, data)
        else:
            await self._publish_raw(self._subject, data, headers=self._headers)
