"""Where a task is: its states, looking it up, and the background checks of a :class:`TaskHandle`.

A task is *known* while it waits in the task stream or has a record in the tasks bucket.
:func:`locate` tells which (:class:`TaskState`); :class:`PresenceWatch` runs a handle's checks in
the background: after ``interval`` seconds without a message, and a few times after a NATS
reconnect (a result published meanwhile is lost on core NATS, but the record holds it). What a
consumer sees of this is documented in :mod:`.handle` ("Not found vs. not yet").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TYPE_CHECKING

from ocbridge.client.protocol import OcbridgeError, TaskRecord, ValidationError

if TYPE_CHECKING:
    from .client import CodingClient

log = logging.getLogger(__name__)

__all__ = ["PresenceWatch", "TaskNotFound", "TaskState", "locate", "state_of"]


class TaskState(StrEnum):
    """Where a task is, as :meth:`TaskHandle.status` finds it (arq's ``JobStatus``)."""

    #: In the task stream; no sidecar has started it yet.
    QUEUED = "queued"
    #: A sidecar runs it.
    RUNNING = "running"
    #: A sidecar gave it back (engine down, sidecar stopping); it waits to run again.
    RETRYING = "retrying"
    #: Its result is decided (and kept in its record).
    COMPLETE = "complete"
    #: Neither queued nor recorded: never submitted, dead-lettered, or its record expired.
    NOT_FOUND = "not_found"
    #: No record, and the task stream could not be searched (too long, or not allowed).
    UNKNOWN = "unknown"


_RECORD_STATES = {
    "running": TaskState.RUNNING,
    "requeued": TaskState.RETRYING,
    "retrying": TaskState.RETRYING,
    "publishing": TaskState.COMPLETE,
    "done": TaskState.COMPLETE,
}


class TaskNotFound(OcbridgeError, LookupError):
    """The task is neither queued nor recorded (arq's ``ResultNotFound``)."""

    default_error_type = "not_found"

    def __init__(self, task_id: str, detail: str | None = None) -> None:
        self.task_id = task_id
        super().__init__(
            f"task {task_id} not found: it is not queued and has no record "
            f"({detail or 'never submitted, dead-lettered, or its record expired with the tasks bucket TTL'})"
        )


def state_of(record: TaskRecord) -> TaskState:
    """The state a task record tells."""
    if record.result is not None:
        return TaskState.COMPLETE
    return _RECORD_STATES.get(record.state, TaskState.RUNNING)


async def locate(
    client: CodingClient, task_id: str, queued_at: tuple[str, int] | None = None
) -> tuple[TaskState, TaskRecord | None]:
    """Where the task is: its record, else whether it waits in the task stream (``queued_at``: the
    stream and sequence it was published at, when known)."""
    try:
        record = await client.task_record(task_id)
    except ValidationError:
        return TaskState.UNKNOWN, None
    if record is not None:
        return state_of(record), record
    queued = await client.is_queued(task_id, queued_at)
    if queued:
        return TaskState.QUEUED, None
    # It may have finished between the two reads: a record is written before a task leaves the stream.
    with contextlib.suppress(ValidationError):
        record = await client.task_record(task_id)
    if record is not None:
        return state_of(record), record
    return (TaskState.NOT_FOUND if queued is False else TaskState.UNKNOWN), None


class PresenceWatch:
    """Runs one handle's presence check (``check``: look the task up and act on what is found)
    in the background until ``settled()`` is true. The handle calls :meth:`heard` on every message."""

    def __init__(self, task_id: str, check: Callable[[], Awaitable[None]], settled: Callable[[], bool]) -> None:
        self.task_id = task_id
        self._check = check
        self._settled = settled
        self._loop = asyncio.get_running_loop()
        self.last_heard = self._loop.time()
        self._watchdog: asyncio.Task | None = None
        self._rechecking: asyncio.Future | None = None

    def heard(self) -> None:
        """A message of the task arrived: no check is due for another interval."""
        self.last_heard = self._loop.time()

    def watch(self, interval: float) -> None:
        """Check whenever nothing was heard for ``interval`` seconds."""
        self._watchdog = asyncio.ensure_future(self._watch(interval))

    def recheck(self, delays: tuple[float, ...]) -> None:
        """Check after each of ``delays`` (seconds from now), unless such checks already run."""
        if self._rechecking and not self._rechecking.done():
            return
        self._rechecking = asyncio.ensure_future(self._recheck(delays))

    def stop(self) -> None:
        """Cancel the background checks (not the one calling this)."""
        for task in (self._watchdog, self._rechecking):
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    async def _recheck(self, delays: tuple[float, ...]) -> None:
        for delay in delays:
            await asyncio.sleep(delay)
            if self._settled():
                return
            try:
                await self._check()
            except Exception as exc:
                log.debug("task %s: check after reconnect failed: %r", self.task_id, exc)

    async def _watch(self, interval: float) -> None:
        while not self._settled():
            await asyncio.sleep(interval)
            if self._settled() or self._loop.time() - self.last_heard < interval:
                continue
            try:
                await self._check()
            except Exception as exc:  # a failed check is retried at the next interval
                log.debug("task %s: presence check failed: %r", self.task_id, exc)
