"""The JetStream side of the sidecar: pull tasks, run them, publish exactly one result, ack.

Delivery rules:
- A task is fetched only when a slot is free and the engine is healthy, so a busy or broken
  sidecar never hoards or swallows the queue.
- A message that cannot be read, or names callback subjects it may not, is dead-lettered (kept,
  logged, terminated); an invalid task whose result subject is its own gets an ``invalid_task``
  error result (:mod:`.intake`). Neither is ever redelivered.
- The result is stored in the task record *before* it is published, then the message is acked
  (:mod:`.answers`): a crash at any step leaves a redelivery that re-publishes the stored result. A copy of a task
  that already has a result (the same ``taskID`` published twice) gets that result again; a copy
  that arrives while the first one runs waits for it.
- While a task runs, progress acks (a third of the consumer's real ``ack_wait``) keep JetStream
  from redelivering it. A run whose sidecar died is retried up to ``max_attempts`` times, then
  answered with ``redelivery_exhausted``; a sidecar on the same host gives a dead one's deliveries
  back at once instead of after ``ack_wait`` (:mod:`.rescue`).
- Failures that are not the task's fault (engine unavailable, KV unavailable) give the task back
  with a delay (``nak``) and do not count against it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ServiceUnavailableError

from ocbridge.bridge.config import BridgeConfig
from ocbridge.bridge.logs import bind_log_fields, log_fields, logged_suppress
from ocbridge.bridge.observability import tracing
from ocbridge.bridge.observability.metrics import NO_METRICS, TaskMetrics
from ocbridge.bridge.pipeline.retry import RetryTask
from ocbridge.bridge.pipeline.runtime import Runtime
from ocbridge.bridge.redact import Redactor
from ocbridge.bridge.storage.leases import SessionLeases
from ocbridge.bridge.storage.stores import NatsArtifacts, NatsKeyValue
from ocbridge.client.kv import get_json
from ocbridge.client.protocol import ErrorType, Task, TaskRecord, TaskStatus, cancel_key, iso_now

from .answers import Answers, error_result, nak
from .cancel import CancelRegistry
from .deadletter import DeadLetters
from .intake import Rejection, read_task
from .journal import ResultJournal
from .ops_server import OpsServer
from .records import TaskRecords
from .rescue import Rescuer, sweep_interval
from .results import Publisher
from .setup import Buckets, ConsumerSettings

log = logging.getLogger(__name__)

#: Task leases share the leases bucket with session leases; session names cannot contain control
#: characters, so this prefix never collides with one.
TASK_LEASE_PREFIX = "\x1ftask:"

#: Seconds between warnings about the same persistent fetch failure.
_FETCH_WARN_INTERVAL = 30.0


class Worker:
    """Consumes tasks from the shared durable consumer with bounded concurrency."""

    def __init__(
        self,
        *,
        nc: NATS,
        js: JetStreamContext,
        stream: str,
        buckets: Buckets,
        consumer: ConsumerSettings,
        runtime: Runtime,
        config: BridgeConfig,
        redactor: Redactor,
        sidecar_id: str,
        healthy: Callable[[], bool] = lambda: True,
        rebind: Callable[[], Awaitable[ConsumerSettings]] | None = None,
        metrics: TaskMetrics = NO_METRICS,
        journal: ResultJournal | None = None,
    ) -> None:
        self._nc = nc
        self._js = js
        self._stream = stream
        self._buckets = buckets
        self._consumer = consumer
        self._pipeline = runtime.pipeline
        self._config = config
        self._naming = config.naming
        self._redactor = redactor
        self._sidecar_id = sidecar_id
        self._healthy = healthy
        self._rebind = rebind
        self._metrics = metrics
        #: Whether the durable consumer is bound (cleared while it is missing and re-created): ``/readyz``.
        self.consumer_bound = False
        self._slots = asyncio.Semaphore(config.concurrency)
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._rescue_task: asyncio.Task[None] | None = None
        self._cancel_sub: Any = None
        self._sub: Any = None
        self.cancels = CancelRegistry()
        self._last_error: tuple[str, str] | None = None
        self._records = TaskRecords(buckets.tasks, redactor, sidecar_id)
        self._task_leases = SessionLeases(
            NatsKeyValue(js, self._naming.leases_bucket, buckets.leases), ttl=config.jetstream.lease_ttl,
            holder=sidecar_id,
        )
        self._publisher = Publisher(nc, NatsArtifacts(buckets.files), redactor)
        self._ops = OpsServer(nc, runtime.ops, redactor, self._publisher, limit=config.concurrency)
        self._answers = Answers(
            nc=nc, records=self._records, publisher=self._publisher,
            dead_letters=DeadLetters(js, self._naming.dead_letter, redactor), journal=journal,
            state_bucket=buckets.state,
            redactor=redactor, metrics=metrics, retry_delay=config.jetstream.retry_delay, note_error=self._note_error,
        )

    async def start(self) -> None:
        await self._bind()
        self._cancel_sub = await self.cancels.listen(self._nc, self._naming.cancel_root)
        await self._ops.start(self._naming.ops_subject, self._naming.ops_queue)
        self._loop_task = asyncio.create_task(self._fetch_loop(), name="ocbridge-fetch")
        rescuer = Rescuer(self._nc, self._task_leases.store, prefix=TASK_LEASE_PREFIX,
                          interval=sweep_interval(self._consumer.ack_wait))
        self._rescue_task = asyncio.create_task(rescuer.run_forever(), name="ocbridge-rescue")
        log.info(
            "sidecar %s consuming %s (stream %s, concurrency %d, ack_wait %.0fs)",
            self._sidecar_id, self._naming.task_subject, self._stream, self._config.concurrency,
            self._consumer.ack_wait,
        )

    @property
    def slots_used(self) -> int:
        """Deliveries being handled now (each holds one of the ``concurrency`` slots)."""
        return len(self._handlers)

    @property
    def last_error(self) -> tuple[str, str] | None:
        """``(when, what)`` of this worker's latest problem (redacted), for the fleet heartbeat."""
        return self._last_error

    def _note_error(self, text: str) -> None:
        self._last_error = (iso_now(), self._redactor.text(text)[:500])

    async def _bind(self) -> None:
        self._sub = await self._js.pull_subscribe_bind(durable=self._naming.consumer_name, stream=self._stream)
        self.consumer_bound = True

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking tasks; let running ones finish within ``grace``, hand the rest back."""
        grace = self._config.shutdown_grace if grace is None else grace
        self._stopping.set()
        if self._rescue_task is not None:
            self._rescue_task.cancel()
            await asyncio.wait({self._rescue_task}, timeout=5)  # bounded: see Rescuer.run_forever
            if not self._rescue_task.done():
                log.warning("the rescue loop did not stop within 5 s; leaving it")
        if self._loop_task is not None:
            with logged_suppress("stopping the fetch loop", log):
                await asyncio.wait_for(self._loop_task, 5)
        if self._handlers:
            log.info("waiting up to %.0fs for %d running task(s)", grace, len(self._handlers))
            _, pending = await asyncio.wait(set(self._handlers), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=15)
        if self._cancel_sub is not None:
            with logged_suppress("unsubscribing from cancels", log):
                await self._cancel_sub.unsubscribe()
        await self._ops.stop(grace)
        if self._sub is not None:
            with logged_suppress("unsubscribing from the consumer", log):
                await self._sub.unsubscribe()

    # ---------------------------------------------------------------------------------- fetching

    async def _fetch_loop(self) -> None:
        warned_at = 0.0
        unhealthy = False
        while not self._stopping.is_set():
            if not self._healthy():
                # A broken engine must not pull (and fail) the queue while healthy sidecars idle.
                if not unhealthy:
                    log.warning("engine unhealthy: not taking tasks until it recovers")
                    self._note_error("engine unhealthy: not taking tasks until it recovers")
                unhealthy = True
                await asyncio.sleep(1.0)
                continue
            if unhealthy:
                log.info("engine healthy again: taking tasks")
                unhealthy = False
            await self._slots.acquire()
            if self._stopping.is_set():
                self._slots.release()
                break
            try:
                msgs = await self._sub.fetch(1, timeout=1.0)
            except TimeoutError:
                self._slots.release()
                continue
            except Exception as exc:
                self._slots.release()
                now = time.monotonic()
                if now - warned_at > _FETCH_WARN_INTERVAL:
                    log.warning("fetching tasks failed: %s", exc)
                    self._note_error(f"fetching tasks failed: {exc}")
                    warned_at = now
                if await self._consumer_missing(exc):
                    self.consumer_bound = False  # until _bind succeeds again
                if not self.consumer_bound and self._rebind is not None:
                    # Tried every loop (the stream may be gone too), warned about with the fetch failure.
                    level = logging.WARNING if warned_at == now else logging.DEBUG
                    with logged_suppress("re-creating the consumer", log, level=level):
                        self._consumer = await self._rebind()
                        await self._bind()
                await asyncio.sleep(0.5)
                continue
            handler = asyncio.create_task(self._handle(msgs[0]))
            self._handlers.add(handler)
            handler.add_done_callback(self._handler_done)

    async def _consumer_missing(self, exc: Exception) -> bool:
        """Whether a failed fetch means the durable consumer is gone: a pull on a deleted consumer
        gets no responder (503), not a 404, so ask the server when it is that."""
        if isinstance(exc, NotFoundError):
            return True
        if not isinstance(exc, ServiceUnavailableError):
            return False
        try:
            await self._js.consumer_info(self._stream, self._naming.consumer_name, timeout=2)
        except NotFoundError:
            return True
        except Exception:  # JetStream itself unavailable: nothing to re-create yet
            return False
        return False

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("task handler crashed: %s", self._redactor.text(repr(task.exception())))
            self._note_error(f"task handler crashed: {task.exception()!r}")

    # ---------------------------------------------------------------------------------- handling

    async def _handle(self, msg: Msg) -> None:
        self._metrics.received(msg.metadata.num_delivered)
        intake = read_task(msg.data, naming=self._naming, max_bytes=self._config.jetstream.max_task_bytes)
        if isinstance(intake, Rejection):
            await self._answers.reject(msg, intake)
            return
        task = intake
        # The task's log fields, and its trace span: a child of the publisher's span when the
        # message carries one (W3C headers), else the start of a new trace (Station).
        with (
            log_fields(task_id=task.task_id, session=task.session.name, workspace=task.workspace.name),
            tracing.task_span(task.task_id, engine=self._config.engine, parent=tracing.extract(msg.headers)),
        ):
            await self._handle_task(msg, task)

    async def _handle_task(self, msg: Msg, task: Task) -> None:
        # One copy of a task is handled at a time, by whichever sidecar holds its task lease: a
        # copy redelivered while its original still runs (after a NATS restart, which forgets
        # progress acks) or a second publish of the same taskID waits instead of running it too.
        lost = asyncio.Event()
        try:
            # The ack subject in the lease lets a sidecar on this host give the message back at
            # once should this one die (see .rescue).
            holding = self._task_leases.try_hold(TASK_LEASE_PREFIX + task.task_id, owner=f"task {task.task_id}",
                                                 on_lost=lost.set, details={"ack": msg.reply})
            async with holding as lease:
                if lease is None:
                    log.info("task %s: another copy is being handled; this one waits", task.task_id)
                    # Offered again within a quarter of the lease TTL: when the holder died, its
                    # lease expires after one TTL and this copy should run soon after.
                    settings = self._config.jetstream
                    await nak(msg, min(settings.retry_delay, max(settings.lease_ttl / 4, 0.5)))
                    return
                await self._deliver(msg, task, lost)
        except Exception as exc:  # the lease store (NATS) is unreachable: not the task's fault
            await self._answers.give_back(msg, task.task_id, f"task lease unavailable: {exc}")

    async def _deliver(self, msg: Msg, task: Task, lost: asyncio.Event) -> None:
        """Decide what this copy of the task gets (its lease is held): the stored result, an error
        when it was tried too often, or a run."""
        try:
            record = await self._records.get(task.task_id)
        except Exception as exc:  # KV trouble is not the task's fault: try again later
            await self._answers.give_back(msg, task.task_id, f"task record unreadable: {exc}")
            return
        seq = msg.metadata.sequence.stream
        if record is not None and record.result is not None:
            if record.state == "done" and record.stream_seq == seq:
                # This very message was answered and only its ack got lost (a NATS restart).
                log.info("task %s: already answered; acking the redelivered message", task.task_id)
                with logged_suppress(f"task {task.task_id}: ack", log):
                    await msg.ack()
                return
            if record.state in ("publishing", "done"):
                await self._answers.republish(msg, task, record)
                return
        runs = (record.attempt or 0) if record else 0
        retries = (record.retries or 0) if record else 0
        # A record left "running" while nobody holds the task lease: that run's sidecar died.
        died = runs - retries if record is not None and record.state == "running" else 0
        settings = self._config.jetstream
        if died >= settings.max_attempts or retries >= settings.max_retries or self._last_delivery(msg):
            error = (f"task given up after {runs} run(s): its sidecar died while running it {died} time(s), "
                     f"it was given back {retries} time(s)")
            await self._answers.finish(msg, task, error_result(task.task_id, error, ErrorType.REDELIVERY_EXHAUSTED),
                               TaskRecord(taskID=task.task_id, state="publishing", attempt=runs, retries=retries,
                                          streamSeq=seq), term=True)
            return
        state = TaskRecord(taskID=task.task_id, state="running", attempt=runs + 1, retries=retries, streamSeq=seq)
        await self._run(msg, task, state, lost)

    async def _run(self, msg: Msg, task: Task, state: TaskRecord, lost: asyncio.Event) -> None:
        task_id, attempt = task.task_id, state.attempt or 1
        bind_log_fields(attempt=attempt)
        cancel = self.cancels.start(task_id)
        keepalive = asyncio.create_task(self._keep_alive(msg, task_id))
        # Losing the task lease (NATS unreachable for a whole TTL) stops the run: another copy
        # may start meanwhile, so this one must not publish a result.
        watch_lease = asyncio.create_task(_set_when(lost, cancel))
        try:
            try:
                if await get_json(self._buckets.state, cancel_key(task_id)) is not None:
                    cancel.set()
                await self._records.put(state)
            except Exception as exc:
                await self._answers.give_back(msg, task_id, f"KV unavailable: {exc}")
                return
            log.info("task %s: attempt %d in workspace %r", task_id, attempt, task.workspace.name)
            if attempt == 1 and not state.retries:  # publish to first start, not to a retry's start
                self._metrics.queue_wait(msg.metadata.timestamp)
            if cancel.is_set() and not lost.is_set():
                result = error_result(task_id, "task cancelled before it started", ErrorType.CANCELLED)
                result.status = TaskStatus.CANCELLED
            else:
                result = await self._pipeline.run(task, cancel, attempt=attempt,
                                                  delivery=f"{task_id} {state.stream_seq}")
        except RetryTask as exc:
            await self._answers.give_back(msg, task_id, str(exc), delay=exc.retry_after, state=state)
            return
        except asyncio.CancelledError:
            # Shutdown past the grace period: give the task back for immediate redelivery.
            await self._answers.give_back(msg, task_id, "the sidecar is stopping", delay=0, state=state, requeued=True)
            raise
        finally:
            keepalive.cancel()
            watch_lease.cancel()
            self.cancels.finish(task_id)
        if lost.is_set():
            await self._answers.give_back(msg, task_id, "its task lease was lost (NATS unreachable)", state=state)
            return
        state.state, state.result = "publishing", None
        await self._answers.finish(msg, task, result, state)

    def _last_delivery(self, msg: Msg) -> bool:
        """Whether this is the consumer's last delivery of the message (``max_deliver``)."""
        limit = self._consumer.max_deliver
        return limit > 0 and (msg.metadata.num_delivered or 1) >= limit

    async def _keep_alive(self, msg: Msg, task_id: str) -> None:
        # A third of the consumer's real ack_wait (which may differ from the configured one).
        interval = max(self._consumer.ack_wait / 3, 0.2)
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except Exception as exc:
                if not failing:  # once per outage, not every interval
                    log.warning("task %s: progress ack failed (%s); it may be redelivered", task_id, exc)
                failing = True
            else:
                failing = False


async def _set_when(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()
