"""How one delivery of a task ends: a result recorded then published then acked, the stored result
published again, a rejection (error result or dead letter), or a give-back (``nak`` with a delay).

The order of :meth:`Answers.finish` is what makes a result exactly-once across crashes: the result
is stored in the task record (state ``publishing``) before it is published, marked ``done`` after,
and the message is acked last. A crash between any two steps leaves a redelivery that finds the
stored result and publishes it instead of running the agent a second time; when the crash came
after the publish, the result journal (:mod:`.journal`) says so and it is not published twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from ocbridge.bridge.logs import logged_suppress
from ocbridge.bridge.observability import tracing
from ocbridge.bridge.observability.metrics import TaskMetrics
from ocbridge.bridge.redact import Redactor
from ocbridge.client.protocol import ErrorType, Task, TaskRecord, TaskResult, TaskStatus, cancel_key

from .deadletter import DeadLetters
from .intake import Rejection
from .journal import RESULT_HEADER, ResultJournal, result_mark
from .records import TaskRecords
from .results import FLUSH_TIMEOUT, Publisher

__all__ = ["Answers", "error_result", "nak"]

log = logging.getLogger(__name__)


def error_result(task_id: str, error: str, error_type: ErrorType) -> TaskResult:
    """An ``error`` result carrying ``error`` as its text."""
    return TaskResult(taskID=task_id, status=TaskStatus.ERROR, result=error, error=error, errorType=error_type)


#: The first give-back of a message waits this long; each further delivery doubles it, up to
#: ``jetstream.retry_delay``. A NATS restart or an OpenCode restart is over in a second or two,
#: so most give-backs should be retried soon; a store that stays broken is not hammered.
FIRST_RETRY_DELAY = 0.5


#: How long recording a published result ``done`` is tried (first retry after the delay, doubling):
#: long enough for a NATS restart, short against ``ack_wait``.
DONE_RETRY_SECONDS = 4.0
DONE_RETRY_FIRST_DELAY = 0.25


def backoff(num_delivered: int, cap: float) -> float:
    """The delay of a give-back of a message delivered ``num_delivered`` times so far."""
    exponent = min(max(num_delivered - 1, 0), 16)
    return min(cap, FIRST_RETRY_DELAY * 2**exponent)


async def nak(msg: Msg, delay: float) -> None:
    """Give the message back for redelivery after ``delay`` seconds (0: at once); never raises."""
    with logged_suppress("nak", log):
        await msg.nak(delay=delay or None)


class Answers:
    """Ends deliveries for the worker. ``note_error`` records an operator-visible problem (the
    fleet heartbeat's last error)."""

    def __init__(
        self,
        *,
        nc: NATS,
        records: TaskRecords,
        publisher: Publisher,
        dead_letters: DeadLetters,
        journal: ResultJournal | None,
        state_bucket: KeyValue,
        redactor: Redactor,
        metrics: TaskMetrics,
        retry_delay: float,
        note_error: Callable[[str], None],
    ) -> None:
        self._nc = nc
        self._records = records
        self._publisher = publisher
        self._dead_letters = dead_letters
        self._journal = journal
        self._state = state_bucket
        self._redactor = redactor
        self._metrics = metrics
        self._retry_delay = retry_delay
        self._note_error = note_error

    def _delay(self, msg: Msg) -> float:
        try:
            delivered = msg.metadata.num_delivered
        except Exception:  # no JetStream metadata: the longest delay
            delivered = None
        return backoff(delivered, self._retry_delay) if delivered is not None else self._retry_delay

    async def _retry_later(self, msg: Msg) -> None:
        await nak(msg, self._delay(msg))

    async def finish(self, msg: Msg, task: Task, result: TaskResult, record: TaskRecord, *, term: bool = False) -> None:
        """Record the result, then publish it, then ack (``term`` for a task given up)."""
        task_id = task.task_id
        tracing.describe_task(task, result, attempt=record.attempt)
        try:
            message = await self._publisher.encode(result.to_dict(), object_prefix=f"output/{task_id}/result")
            record.result = TaskResult.from_wire(message)
            record.state = "publishing"
            await self._records.put(record)
        except Exception as exc:
            log.error("task %s: cannot store its result (%s); it will run again", task_id, exc)
            self._note_error(f"task {task_id}: cannot store its result: {exc}")
            await self._retry_later(msg)
            return
        self._metrics.finished(result)  # decided and stored: a re-publish of it is not counted again
        if result.status == TaskStatus.CANCELLED:
            # A cancel may have left cancel.<taskID> in the state bucket: no longer needed once the
            # result is stored; gone before anyone sees the result.
            with logged_suppress(f"task {task_id}: deleting its cancel key", log, level=logging.DEBUG):
                await self._state.delete(cancel_key(task_id))
        if not await self._publish(task, message, record):
            await self._retry_later(msg)  # re-published on redelivery
            return
        await self._record_done(record)
        with logged_suppress(f"task {task_id}: ack", log):
            await (msg.term() if term else msg.ack())
        log.info(
            "task %s: %s in %d ms (%d events)",
            task_id, result.status.value, result.metrics.duration, result.metrics.stream_events,
        )

    async def republish(self, msg: Msg, task: Task, record: TaskRecord) -> None:
        """A copy of a task that already has a result (a duplicate publish, or a redelivery after
        the result was stored): publish the same result again, never run the agent twice."""
        assert record.result is not None
        if await self._published_before(msg, task, record):
            log.info("task %s: its result was published before its sidecar stopped; not publishing it again",
                     task.task_id)
            await self._record_done(record)
            with logged_suppress(f"task {task.task_id}: ack", log):
                await msg.ack()
            return
        log.info("task %s already has a result (%s); publishing it again", task.task_id, record.state)
        tracing.add_event("result.republished", {"record.state": record.state})
        if not await self._publish(task, record.result.to_wire(), record):
            await self._retry_later(msg)
            return
        if record.state != "done":
            await self._record_done(record)
        with logged_suppress(f"task {task.task_id}: ack", log):
            await msg.ack()

    async def _record_done(self, record: TaskRecord) -> None:
        """Mark the published result ``done``, trying again through a short NATS outage: a
        redelivery of a message recorded done is only acked, one still ``publishing`` has its
        result published again (a second result message, which clients drop, but avoidable)."""
        record.state = "done"
        delay, deadline = DONE_RETRY_FIRST_DELAY, time.monotonic() + DONE_RETRY_SECONDS
        while True:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.1)):
                    await self._records.put(record)
                return
            except Exception as exc:
                if time.monotonic() + delay >= deadline:
                    log.warning("task %s: recording it done failed (%s: %s); a redelivery publishes its "
                                "result again", record.task_id, type(exc).__name__, exc)
                    return
            await asyncio.sleep(delay)
            delay *= 2

    async def reject(self, msg: Msg, rejection: Rejection) -> None:
        """A task that will not run: an error result where the task may be answered, else a dead letter."""
        if rejection.result_subject is None or rejection.task_id is None:
            self._metrics.dead_lettered()
            await self._dead_letters.send(msg, rejection.reason)
            return
        log.warning("task %s rejected: %s", rejection.task_id, self._redactor.text(rejection.reason))
        result = error_result(rejection.task_id, rejection.reason, ErrorType.INVALID_TASK)
        try:
            message = await self._publisher.encode(result.to_dict(), object_prefix=f"output/{rejection.task_id}/result")
            await self._nc.publish(rejection.result_subject, message)
            await self._nc.flush(timeout=FLUSH_TIMEOUT)
        except Exception as exc:
            log.error("task %s: publishing its rejection failed (%s)", rejection.task_id, exc)
            await self._retry_later(msg)
            return
        self._metrics.finished(result)
        with logged_suppress(f"task {rejection.task_id}: ack", log):
            await msg.ack()

    async def give_back(
        self, msg: Msg, task_id: str, reason: str, *, delay: float | None = None,
        state: TaskRecord | None = None, requeued: bool = False,
    ) -> None:
        """Hand the task back without a result: it was not the task's fault, so the run does not
        count against its attempts (``state``: the run's record, marked retrying or requeued)."""
        delay = self._delay(msg) if delay is None else delay
        self._metrics.gave_back()
        tracing.add_event("task.given_back", {"reason": self._redactor.text(reason), "retry_in": delay})
        log.warning("task %s given back (retry in %.1fs): %s", task_id, delay, self._redactor.text(reason))
        if not requeued:  # a graceful stop's hand-back is no problem
            self._note_error(f"task {task_id} given back: {reason}")
        if state is not None:
            state.state = "requeued" if requeued else "retrying"
            state.retries = (state.retries or 0) + 1
            with logged_suppress(f"task {task_id}: recording the give-back", log):
                await self._records.put(state)
        await nak(msg, delay)

    async def _published_before(self, msg: Msg, task: Task, record: TaskRecord) -> bool:
        """Whether this message's stored result is in the journal: its sidecar published it and
        died before recording it ``done``. (Another copy of the task is answered regardless.)"""
        if self._journal is None or record.state != "publishing":
            return False
        try:
            if record.stream_seq != msg.metadata.sequence.stream:
                return False
        except Exception:  # no JetStream metadata: cannot be the same message
            return False
        return bool(await self._journal.published(task.callback.result_subject, record))

    async def _publish(self, task: Task, message: bytes, record: TaskRecord) -> bool:
        # The mark tells the journal which result this is; the task span's trace context travels
        # back with the result (when traced).
        headers = {**(tracing.trace_headers() or {}), RESULT_HEADER: result_mark(record)}
        try:
            await self._nc.publish(task.callback.result_subject, message, headers=headers)
            await self._nc.flush(timeout=FLUSH_TIMEOUT)
        except Exception as exc:
            log.error("task %s: publishing its result failed (%s); it will be published again", task.task_id, exc)
            self._note_error(f"task {task.task_id}: publishing its result failed: {exc}")
            return False
        return True
