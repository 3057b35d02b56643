"""A handle on one submitted task: iterate its live events, await its result, cancel it.

What a consumer can rely on
===========================

**Attempts.** A task the sidecar gives back (its sidecar died, OpenCode was restarting) runs again
as a new *attempt* whose events start over at ``seq`` 1. Every event carries its attempt
(``event.attempt``; Station-era sidecars send none, which means 1, and a later ``seq`` 1 from such a
sidecar is taken as the start of the next attempt). The handle fills ``attempt`` in on every event it
yields, and :attr:`TaskHandle.attempt` is the latest attempt seen.

**Order and duplicates.** Events are yielded in strictly increasing ``(attempt, seq)`` order. An
event at or below the last one accepted is a duplicate or belongs to an attempt that has been
superseded: it is dropped. When an event of a newer attempt arrives, the events of older attempts
still buffered are dropped too, so what remains to be read always belongs to the latest attempt; a
consumer that sees ``attempt`` grow (and ``seq`` start again at 1) should discard what it kept of the
older attempt. A gap in ``seq`` is events lost in transit (core NATS is at most once); it is not
waited for.

**End of iteration.** Iteration ends once the result has arrived *and* the events it reports have
been yielded: the latest attempt has reached ``result.metrics.streamEvents`` and no event is still
queued on the subscription (the result and the events travel on two subscriptions, so the result can
be processed first). Events that never arrive are waited for ``late_event_grace`` seconds at most.
A result read from the task record (watching a finished task) ends iteration at once.

**Buffering.** Events wait in a buffer of at most ``max_buffered_events`` events and
``max_buffered_bytes`` bytes until they are read. When it is full, the *oldest* event is dropped
(counted in :attr:`TaskHandle.dropped_events`, shown to the consumer as a gap in ``seq``): a slow
reader skips ahead to the live edge. :meth:`CodingClient.run` does not subscribe to events at all;
a handle made with ``events=False`` subscribes only when first iterated (and sees events from then on).

**Not found vs. not yet.** A task is *known* while it waits in the task stream or has a record in
the tasks bucket (from the moment a sidecar starts it until the bucket's TTL removes it). When
neither holds, :meth:`CodingClient.watch` raises :class:`TaskNotFound` at once, and a handle that
has heard nothing for ``presence_interval`` seconds checks again: a task that has vanished ends
``result()`` and the iteration with :class:`TaskNotFound` instead of waiting for ever, and a result
missed in transit (the client was reconnecting) is taken from the record.

The ordering and buffering rules are applied by :mod:`.event_buffer`; the task's states, its
look-up and the background checks are :mod:`.presence`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from ocbridge.client.protocol import StreamEvent, TaskRecord, TaskResult, ValidationError

from . import tracing
from .event_buffer import EventBuffer
from .presence import PresenceWatch, TaskNotFound, TaskState, locate

if TYPE_CHECKING:
    from .client import CodingClient

log = logging.getLogger(__name__)

__all__ = ["TaskHandle", "TaskNotFound", "TaskState"]

DEFAULT_MAX_BUFFERED_EVENTS = 10_000
DEFAULT_MAX_BUFFERED_BYTES = 32 * 1024 * 1024
DEFAULT_LATE_EVENT_GRACE = 2.0
DEFAULT_PRESENCE_INTERVAL = 10.0


class TaskHandle:
    """Like arq's ``Job``: returned by :meth:`CodingClient.submit` (or :meth:`CodingClient.watch`).

    The subscriptions are opened *before* the task is published, so no event is missed. Iterate
    with ``async for event in handle`` and/or ``await handle.result(timeout=...)`` in any order;
    :meth:`status` and :meth:`info` read the task record. See the module documentation for the
    exact semantics of attempts, duplicates, buffering and the end of iteration.

    Counters: :attr:`dropped_events` (dropped because the buffer was full) and
    :attr:`ignored_events` (duplicates, and events of superseded attempts).
    """

    def __init__(
        self,
        client: CodingClient,
        task_id: str,
        stream_subject: str,
        result_subject: str,
        *,
        max_buffered_events: int = DEFAULT_MAX_BUFFERED_EVENTS,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        late_event_grace: float = DEFAULT_LATE_EVENT_GRACE,
        presence_interval: float | None = DEFAULT_PRESENCE_INTERVAL,
        queued_at: tuple[str, int] | None = None,
    ) -> None:
        self.task_id = task_id
        self.stream_subject = stream_subject
        self.result_subject = result_subject
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._grace = late_event_grace
        self._presence_interval = presence_interval
        #: (stream, sequence) of the task message when this client published it.
        self._queued_at = queued_at

        self._result: asyncio.Future[TaskResult] = self._loop.create_future()
        self._backlog = EventBuffer(task_id, max_buffered_events, max_buffered_bytes)
        self._wakeup = asyncio.Event()
        self._finished = False
        self._grace_timer: asyncio.TimerHandle | None = None
        self._events_sub: Any = None
        self._result_sub: Any = None
        self._events_wanted = False
        self._closed = False
        self._presence = PresenceWatch(task_id, self._check_presence, settled=self._result.done)
        self._closing: asyncio.Task | None = None
        #: W3C headers of this client's ``client.submit`` span, and the sidecar's task span's
        #: ``traceparent`` from its events or result (see :mod:`.tracing`).
        self._submit_headers: dict[str, str] | None = None
        self.traceparent: str | None = None

    # ------------------------------------------------------------------------- subscriptions

    async def _subscribe(self, *, events: bool = True) -> None:
        nc = self._client.nc
        if events:
            self._events_wanted = True
            self._events_sub = await nc.subscribe(self.stream_subject, cb=self._on_event)
        self._result_sub = await nc.subscribe(self.result_subject, cb=self._on_result)
        if self._presence_interval:
            self._presence.watch(self._presence_interval)

    async def _subscribe_events_late(self) -> None:
        """A handle made without events is iterated: follow its events from now on."""
        self._events_wanted = True
        if self._finished or self._closed or self._result.done():
            return
        self._events_sub = await self._client.nc.subscribe(self.stream_subject, cb=self._on_event)

    # ------------------------------------------------------------------------------ callbacks

    async def _on_event(self, msg: Msg) -> None:
        self._presence.heard()
        headers = getattr(msg, "headers", None)  # None: sent without headers (Station, untraced)
        if headers:
            self._note_trace(headers)
        try:
            event = StreamEvent.from_wire(msg.data)
        except (ValidationError, ValueError):
            log.warning("task %s: ignoring malformed event", self.task_id)
        else:
            if event.task_id != self.task_id:
                log.warning("task %s: ignoring an event of task %s on its subject", self.task_id, event.task_id)
            else:
                self._accept(event, len(msg.data))
        self._check_settled()

    def _accept(self, event: StreamEvent, size: int) -> None:
        """Buffer ``event`` unless it is a duplicate or stale; the ordering rules of the module doc."""
        if not self._finished and self._backlog.accept(event, size):
            self._wakeup.set()

    def _note_trace(self, headers: dict[str, str]) -> None:
        parent = headers.get("traceparent")
        if parent and tracing.trace_id_of(headers):
            self.traceparent = parent

    async def _on_result(self, msg: Msg) -> None:
        self._presence.heard()
        if self._result.done():
            return  # exactly one result counts; a re-published copy changes nothing
        headers = getattr(msg, "headers", None)
        if headers:
            self._note_trace(headers)
        # Reading the result (and its spilled fields) continues the task's trace: ``client.result``.
        with tracing.result_span(self.task_id, headers, self._submit_headers) as span:
            result = await self._read_result(msg)
            if span is not None and result is not None and span.is_recording():
                span.set_attribute("ocbridge.status", result.status.value)
        if result is not None:
            self._set_result(result)

    async def _read_result(self, msg: Msg) -> TaskResult | None:
        try:
            data = json.loads(msg.data)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            data = await self._client.unspill(data)
            result = TaskResult.model_validate(data)
        except (ValidationError, ValueError) as exc:
            log.warning("task %s: ignoring malformed result (%s)", self.task_id, exc)
            return None
        if result.task_id != self.task_id:
            log.warning("task %s: ignoring a result of task %s on its subject", self.task_id, result.task_id)
            return None
        return result

    def _set_result(self, result: TaskResult, *, from_record: bool = False) -> None:
        if self._result.done():
            return
        self._result.set_result(result)
        self._wakeup.set()
        if from_record or self._events_sub is None:
            self._finish()
            return
        self._check_settled()
        if not self._finished:
            self._grace_timer = self._loop.call_later(self._grace, self._finish)

    def _fail(self, exc: BaseException) -> None:
        if self._result.done():
            return
        self._result.set_exception(exc)
        self._result.exception()  # retrieved: no "never retrieved" warning when nobody waits
        self._wakeup.set()
        self._schedule_close()

    def _check_settled(self) -> None:
        """End iteration once the result's events are all in (see the module doc)."""
        if self._finished or not self._result.done() or self._result.exception() is not None:
            return
        expected = self._result.result().metrics.stream_events
        in_flight = getattr(self._events_sub, "pending_msgs", 0) if self._events_sub is not None else 0
        if self._backlog.last_seq >= expected and not in_flight:
            self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        if self._result.done() and self._result.exception() is None:
            missing = self._result.result().metrics.stream_events - self._backlog.last_seq
            if self._events_sub is not None and missing > 0:
                log.info("task %s: result reports %d events of attempt %d; %d never arrived",
                         self.task_id, self._result.result().metrics.stream_events, self._backlog.attempt, missing)
        self._wakeup.set()
        self._schedule_close()

    def _schedule_close(self) -> None:
        # Not awaited here: this runs inside a subscription's callback, which close() would cancel.
        if self._closing is None and not self._closed:
            self._closing = asyncio.ensure_future(self.close())

    # --------------------------------------------------------------------------- presence check

    async def _lookup(self) -> tuple[TaskState, TaskRecord | None]:
        """Where the task is: its record, else whether it waits in the task stream."""
        return await locate(self._client, self.task_id, self._queued_at)

    def _apply(self, state: TaskState, record: TaskRecord | None) -> None:
        if record is not None and record.result is not None:
            self._set_result(record.result, from_record=True)
        elif state is TaskState.NOT_FOUND:
            self._fail(TaskNotFound(self.task_id))

    #: Seconds after a reconnect at which the task is looked up: a result published while this
    #: client was disconnected is lost on core NATS, but its record holds it.
    RECHECK_AFTER_RECONNECT = (0.5, 2.0, 5.0)

    def recheck(self) -> None:
        """Look the task up again soon (the client calls this after a NATS reconnect)."""
        if self._result.done() or self._closed:
            return
        self._presence.recheck(self.RECHECK_AFTER_RECONNECT)

    async def _check_presence(self) -> None:
        self._apply(*await self._lookup())

    # ------------------------------------------------------------------------------ public API

    @property
    def done(self) -> bool:
        """True once the result has arrived."""
        return self._result.done() and self._result.exception() is None

    @property
    def trace_id(self) -> str | None:
        """The id of the task's trace (32 hex digits): the sidecar's, once its events or result
        named it, else this client's ``client.submit`` span's; ``None`` when neither side traces."""
        return tracing.trace_id_of({"traceparent": self.traceparent or ""}) or tracing.trace_id_of(
            self._submit_headers)

    @property
    def attempt(self) -> int | None:
        """The latest attempt whose events were seen (``None`` before any event)."""
        return self._backlog.attempt or None

    @property
    def dropped_events(self) -> int:
        """Events dropped unread because the buffer was full."""
        return self._backlog.dropped

    @property
    def ignored_events(self) -> int:
        """Duplicates, and events of superseded attempts."""
        return self._backlog.ignored

    @property
    def _buffer(self) -> deque[tuple[StreamEvent, int]]:
        # The unread (event, size) pairs, oldest first; the buffer itself is self._backlog.
        return self._backlog.events

    @property
    def _buffered_bytes(self) -> int:
        return self._backlog.bytes

    async def result(self, timeout: float | None = None) -> TaskResult:
        """Wait for the task's single result, its spilled fields read back from the object store
        (a field whose object cannot be read stays listed in ``result.spilled``).

        Raises :class:`TimeoutError` after ``timeout`` seconds and :class:`TaskNotFound` when the
        task turns out to be neither queued nor recorded.
        """
        try:
            return await asyncio.wait_for(asyncio.shield(self._result), timeout)
        except TimeoutError:
            raise TimeoutError(f"task {self.task_id}: no result within {timeout}s") from None

    async def events(self, timeout: float | None = None) -> AsyncIterator[StreamEvent]:
        """Yield events live until the result arrives. ``timeout`` bounds the whole iteration."""
        if not self._events_wanted:
            await self._subscribe_events_late()
        deadline = None if timeout is None else self._loop.time() + timeout
        while True:
            event = self._backlog.pop()
            if event is not None:
                yield event
                continue
            if self._finished:
                return
            if self._result.done() and self._result.exception() is not None:
                raise self._result.exception()  # type: ignore[misc]
            if self._closed and not self._result.done():
                return  # closed by its owner: nothing more will come
            self._wakeup.clear()
            remaining = None if deadline is None else max(deadline - self._loop.time(), 0)
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                raise TimeoutError(f"task {self.task_id}: no result within {timeout}s") from None

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self.events()

    async def status(self) -> TaskState:
        """Where the task is now (reads the task record, and the task stream when there is none)."""
        if self.done:
            return TaskState.COMPLETE
        state, record = await self._lookup()
        self._apply(state, record)
        return state

    async def info(self) -> TaskRecord | None:
        """The task record (sidecar, attempt, state, result), or ``None`` while there is none."""
        record = await self._client.task_record(self.task_id)
        if record is not None and record.result is not None:
            self._set_result(record.result, from_record=True)
        return record

    async def cancel(self, reason: str | None = None) -> None:
        """Ask the sidecar to stop the task; the result then has status ``cancelled``."""
        await self._client.cancel(self.task_id, reason=reason)

    async def close(self) -> None:
        """Drop the subscriptions (done automatically once the result and its events are in).

        Events already buffered can still be read."""
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        self._presence.stop()
        subs, self._events_sub, self._result_sub = [self._events_sub, self._result_sub], None, None
        for sub in subs:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id} done={self.done} attempt={self.attempt}>"
