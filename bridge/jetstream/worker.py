"""The JetStream side of the sidecar: pull tasks, run them, publish one result, ack.

Delivery rules:
- A task is acked only after its result is published (and recorded), so a sidecar that dies
  mid-task leaves it to be redelivered to another one after ``ack_wait``.
- While a task runs, progress acks keep JetStream from redelivering it.
- A message that is not JSON, or a task whose callback cannot be read, is dead-lettered (kept on
  the dead-letter subject, logged) and terminated: it never loops.
- A task that cannot be validated but has a readable callback gets an ``invalid_task`` error result.
- A task delivered more than ``max_attempts`` times gets a ``redelivery_exhausted`` error result.
- A task whose result was already published (the sidecar died between publish and ack) is acked
  without running again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import ValidationError

from ocbridge.bridge.config import BridgeConfig
from ocbridge.bridge.pipeline.runtime import Runtime
from ocbridge.bridge.redact import Redactor
from ocbridge.client.kv import get_json
from ocbridge.client.protocol import (
    ErrorType,
    Task,
    TaskRecord,
    TaskResult,
    TaskStatus,
    cancel_key,
    describe_validation_error,
    is_concrete_subject,
    record_key,
)

from .cancel import CancelRegistry
from .deadletter import DeadLetters
from .ops_server import OpsServer
from .setup import Buckets

log = logging.getLogger(__name__)


class Worker:
    """Consumes tasks from the shared durable consumer with bounded concurrency."""

    def __init__(
        self,
        *,
        nc: NATS,
        js: JetStreamContext,
        stream: str,
        buckets: Buckets,
        runtime: Runtime,
        config: BridgeConfig,
        redactor: Redactor,
        sidecar_id: str,
    ) -> None:
        self._nc = nc
        self._js = js
        self._stream = stream
        self._buckets = buckets
        self._pipeline = runtime.pipeline
        self._config = config
        self._naming = config.naming
        self._redactor = redactor
        self._sidecar_id = sidecar_id
        self._slots = asyncio.Semaphore(config.concurrency)
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._cancel_sub: Any = None
        self.cancels = CancelRegistry()
        self._ops = OpsServer(nc, runtime.ops, redactor)
        self._dead_letters = DeadLetters(js, self._naming.dead_letter, redactor)

    async def start(self) -> None:
        self._sub = await self._js.pull_subscribe_bind(
            durable=self._naming.consumer_name, stream=self._stream
        )
        self._cancel_sub = await self.cancels.listen(self._nc, self._naming.cancel_root)
        await self._ops.start(self._naming.ops_subject, self._naming.ops_queue)
        self._loop_task = asyncio.create_task(self._fetch_loop(), name="ocbridge-fetch")
        log.info(
            "sidecar %s consuming %s (stream %s, concurrency %d)",
            self._sidecar_id, self._naming.task_subject, self._stream, self._config.concurrency,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking tasks; let running ones finish within ``grace``, hand the rest back."""
        grace = self._config.shutdown_grace if grace is None else grace
        self._stopping.set()
        if self._loop_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._loop_task, 5)
        if self._handlers:
            log.info("waiting up to %.0fs for %d running task(s)", grace, len(self._handlers))
            _, pending = await asyncio.wait(set(self._handlers), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=15)
        if self._cancel_sub is not None:
            with contextlib.suppress(Exception):
                await self._cancel_sub.unsubscribe()
        await self._ops.stop(grace)
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    # ---------------------------------------------------------------------------------- fetching

    async def _fetch_loop(self) -> None:
        while not self._stopping.is_set():
            await self._slots.acquire()
            if self._stopping.is_set():
                self._slots.release()
                break
            try:
                msgs = await self._sub.fetch(1, timeout=1.0)
            except TimeoutError:
                self._slots.release()
                continue
            except Exception as exc:  # connection trouble: NATS reconnects by itself
                self._slots.release()
                log.debug("fetch failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            handler = asyncio.create_task(self._handle(msgs[0]))
            self._handlers.add(handler)
            handler.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("task handler crashed: %s", self._redactor.text(repr(task.exception())))

    # ---------------------------------------------------------------------------------- handling

    async def _handle(self, msg: Msg) -> None:
        attempt = msg.metadata.num_delivered or 1
        try:
            raw = json.loads(msg.data)
            if not isinstance(raw, dict):
                raise ValueError("task must be a JSON object")
        except ValueError as exc:
            await self._dead_letters.send(msg, f"not a JSON object: {exc}")
            return
        try:
            task = Task.from_wire(raw)
        except ValidationError as exc:
            await self._reject(msg, raw, exc)
            return

        task_id = task.task_id
        record = await get_json(self._buckets.tasks, record_key(task_id))
        if record and record.get("state") == "done":
            log.warning("task %s already has a result; acking redelivered copy", task_id)
            await msg.ack()
            return
        if attempt > self._config.jetstream.max_attempts:
            error = f"task failed {attempt - 1} delivery attempts (a sidecar died while running it)"
            result = self._error_result(task_id, error, ErrorType.REDELIVERY_EXHAUSTED)
            await self._finish(msg, task, result, attempt, term=True)
            return

        cancel = self.cancels.start(task_id)
        if await get_json(self._buckets.state, cancel_key(task_id)) is not None:
            cancel.set()
        await self._record(TaskRecord(taskID=task_id, state="running", sidecar=self._sidecar_id, attempt=attempt))
        log.info("task %s: attempt %d in workspace %r", task_id, attempt, task.workspace.name)
        keepalive = asyncio.create_task(self._keep_alive(msg))
        try:
            if cancel.is_set():
                result = self._error_result(task_id, "task cancelled before it started", ErrorType.CANCELLED)
                result.status = TaskStatus.CANCELLED
            else:
                result = await self._pipeline.run(task, cancel)
        except asyncio.CancelledError:
            # Shutdown past the grace period: give the task back for immediate redelivery.
            keepalive.cancel()
            with contextlib.suppress(Exception):
                await msg.nak()
                await self._record(TaskRecord(taskID=task_id, state="requeued", sidecar=self._sidecar_id))
            log.warning("task %s handed back for redelivery", task_id)
            raise
        finally:
            keepalive.cancel()
            self.cancels.finish(task_id)
        await self._finish(msg, task, result, attempt)

    async def _finish(self, msg: Msg, task: Task, result: TaskResult, attempt: int, *, term: bool = False) -> None:
        await self._publish_result(task.callback.result_subject, result)
        with contextlib.suppress(Exception):
            await self._record(
                TaskRecord(taskID=task.task_id, state="done", sidecar=self._sidecar_id, attempt=attempt, result=result)
            )
        if term:
            await msg.term()
        else:
            await msg.ack()
        log.info(
            "task %s: %s in %d ms (%d events)",
            task.task_id, result.status.value, result.metrics.duration, result.metrics.stream_events,
        )

    async def _keep_alive(self, msg: Msg) -> None:
        interval = max(self._config.jetstream.ack_wait / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _publish_result(self, subject: str, result: TaskResult) -> None:
        payload = self._redactor.data(result.to_dict())
        await self._nc.publish(subject, json.dumps(payload, separators=(",", ":")).encode())
        await self._nc.flush(timeout=5)

    async def _record(self, record: TaskRecord) -> None:
        payload = self._redactor.data(record.to_dict())
        await self._buckets.tasks.put(record_key(record.task_id), json.dumps(payload).encode())

    def _error_result(self, task_id: str, error: str, error_type: ErrorType) -> TaskResult:
        return TaskResult(taskID=task_id, status=TaskStatus.ERROR, result=error, error=error, errorType=error_type)

    async def _reject(self, msg: Msg, raw: dict[str, Any], exc: ValidationError) -> None:
        """An invalid task: error result when we know where to send it, else dead letter."""
        problems = describe_validation_error(exc)
        callback = raw.get("callback")
        result_subject = callback.get("resultSubject") if isinstance(callback, dict) else None
        task_id = raw.get("taskID") if isinstance(raw.get("taskID"), str) else None
        if not isinstance(result_subject, str) or not result_subject or not is_concrete_subject(result_subject):
            await self._dead_letters.send(msg, f"invalid task and no result subject: {problems}")
            return
        task_id = task_id or result_subject.rsplit(".", 1)[-1]
        log.warning("task %s rejected: %s", task_id, self._redactor.text(problems))
        result = self._error_result(task_id, f"invalid task: {problems}", ErrorType.INVALID_TASK)
        await self._publish_result(result_subject, result)
        await msg.ack()
