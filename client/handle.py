"""A handle on one submitted task: iterate its live events, await its result, cancel it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from nats.aio.msg import Msg

from ocbridge.client.protocol import StreamEvent, TaskRecord, TaskResult, ValidationError, record_key

from .kv import get_json

if TYPE_CHECKING:
    from .client import CodingClient

log = logging.getLogger(__name__)

_DONE = object()


class TaskHandle:
    """Like arq's ``Job``: returned by :meth:`CodingClient.submit` (or :meth:`CodingClient.watch`).

    The subscriptions are opened *before* the task is published, so no event is missed. Events
    and the result are buffered; iterate with ``async for event in handle`` and/or
    ``await handle.result(timeout=...)`` in any order.
    """

    def __init__(self, client: CodingClient, task_id: str, stream_subject: str, result_subject: str) -> None:
        self.task_id = task_id
        self.stream_subject = stream_subject
        self.result_subject = result_subject
        self._client = client
        self._events: asyncio.Queue[StreamEvent | object] = asyncio.Queue()
        self._result: asyncio.Future[TaskResult] = asyncio.get_running_loop().create_future()
        self._subs: list = []

    async def _subscribe(self) -> None:
        nc = self._client.nc
        self._subs.append(await nc.subscribe(self.stream_subject, cb=self._on_event))
        self._subs.append(await nc.subscribe(self.result_subject, cb=self._on_result))

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = StreamEvent.from_wire(msg.data)
        except (ValidationError, ValueError):
            log.warning("task %s: ignoring malformed event", self.task_id)
            return
        self._events.put_nowait(event)

    async def _on_result(self, msg: Msg) -> None:
        try:
            result = TaskResult.from_wire(msg.data)
        except (ValidationError, ValueError):
            log.warning("task %s: ignoring malformed result", self.task_id)
            return
        self._set_result(result)

    def _set_result(self, result: TaskResult) -> None:
        if not self._result.done():
            self._result.set_result(result)
            self._events.put_nowait(_DONE)

    async def _check_record(self) -> None:
        """Pick up a result already published before we subscribed (watching a finished task)."""
        data = await get_json(await self._client.tasks_bucket(), record_key(self.task_id))
        if data:
            with contextlib.suppress(ValidationError, ValueError):
                record = TaskRecord.model_validate(data)
                if record.result is not None:
                    self._set_result(record.result)

    # ------------------------------------------------------------------------------ public API

    @property
    def done(self) -> bool:
        """True once the result has arrived."""
        return self._result.done()

    async def result(self, timeout: float | None = None) -> TaskResult:
        """Wait for the task's single result. Raises :class:`TimeoutError` after ``timeout`` s."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._result), timeout)
        finally:
            if self._result.done():
                await self.close()

    async def events(self, timeout: float | None = None) -> AsyncIterator[StreamEvent]:
        """Yield events live until the result arrives. ``timeout`` bounds the whole iteration."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else max(deadline - loop.time(), 0)
            try:
                item = await asyncio.wait_for(self._events.get(), remaining)
            except TimeoutError:
                raise TimeoutError(f"task {self.task_id}: no result within {timeout}s") from None
            if item is _DONE:
                # The result can overtake late events only across reconnects; drain what is queued.
                while not self._events.empty():
                    late = self._events.get_nowait()
                    if late is not _DONE:
                        yield late  # type: ignore[misc]
                return
            yield item  # type: ignore[misc]

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self.events()

    async def cancel(self, reason: str | None = None) -> None:
        """Ask the sidecar to stop the task; the result then has status ``cancelled``."""
        await self._client.cancel(self.task_id, reason=reason)

    async def close(self) -> None:
        """Drop the subscriptions (done automatically once the result was read)."""
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id} done={self.done}>"

