"""``CodingClient``: the Station-side API for submitting coding tasks to sidecars over NATS.

It builds, publishes, watches and cancels tasks, runs workspace operations and reads what the
sidecars keep (task records, sessions, artifacts). A task's live side is its :class:`TaskHandle`
(:mod:`.handle`); the reads and writes of JetStream storage underneath are :mod:`.store`.
"""

from __future__ import annotations

import json
import logging
import uuid
import weakref
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.errors import NoStreamResponseError, NotFoundError
from nats.js.kv import KeyValue

from ocbridge.client.protocol import (
    CancelRequest,
    GitOpRequest,
    GitOpResult,
    GitSpec,
    ModelRef,
    Naming,
    SessionSpec,
    SessionState,
    Task,
    TaskCallback,
    TaskRecord,
    TaskResult,
    WorkspaceSpec,
    cancel_key,
    kv_key,
    record_key,
)

from . import tracing
from .connection import NatsOptions, connect
from .handle import (
    DEFAULT_LATE_EVENT_GRACE,
    DEFAULT_MAX_BUFFERED_BYTES,
    DEFAULT_MAX_BUFFERED_EVENTS,
    DEFAULT_PRESENCE_INTERVAL,
    TaskHandle,
    TaskNotFound,
    TaskState,
)
from .kv import get_json, list_keys
from .store import ClientStore
from .streams import DEFAULT_MAX_AGE, ensure_task_stream

log = logging.getLogger(__name__)


class CodingClient:
    """Connects to NATS and talks to the sidecars.

    ::

        async with await CodingClient.connect("nats://127.0.0.1:4222") as client:
            handle = await client.submit("create hello.txt with content hi", workspace="demo")
            async for event in handle:
                print(event.type, event.content)
            result = await handle.result(timeout=60)
    """

    def __init__(
        self,
        nc: NATS,
        naming: Naming | None = None,
        *,
        owns_connection: bool = False,
        max_buffered_events: int = DEFAULT_MAX_BUFFERED_EVENTS,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        late_event_grace: float = DEFAULT_LATE_EVENT_GRACE,
        presence_interval: float | None = DEFAULT_PRESENCE_INTERVAL,
        spill_timeout: float = 30.0,
        cancel_ttl: float = DEFAULT_MAX_AGE,
        queue_scan_limit: int = 1000,
    ) -> None:
        """``max_buffered_events``/``max_buffered_bytes``, ``late_event_grace`` and
        ``presence_interval`` (``None``: never check) shape every :class:`TaskHandle` (see
        :mod:`.handle`). ``spill_timeout`` bounds the reading back of a message's spilled fields
        from the object store. ``cancel_ttl``: how long a cancel recorded for a queued task is
        kept (as long as a task may wait in the task stream). ``queue_scan_limit``: how many queued
        tasks :meth:`watch` looks through for a task it did not publish itself."""
        self.nc = nc
        self.naming = naming or Naming()
        self._owns = owns_connection
        self._js = nc.jetstream()
        self._store = ClientStore(self._js)
        self.max_buffered_events = max_buffered_events
        self.max_buffered_bytes = max_buffered_bytes
        self.late_event_grace = late_event_grace
        self.presence_interval = presence_interval
        self.spill_timeout = spill_timeout
        self.cancel_ttl = cancel_ttl
        self.queue_scan_limit = queue_scan_limit
        self._handles: weakref.WeakSet[TaskHandle] = weakref.WeakSet()

    @classmethod
    async def connect(
        cls,
        url: str | NatsOptions | None = None,
        *,
        naming: Naming | None = None,
        retry_for: float = 10.0,
        **settings: Any,
    ) -> CodingClient:
        """Connect (retrying for ``retry_for`` seconds) and return a client that owns the connection.

        ``settings``: the keyword arguments of the constructor."""
        options = url if isinstance(url, NatsOptions) else NatsOptions(url=url, name="ocbridge-client")
        clients: list[CodingClient] = []

        async def on_reconnect() -> None:
            log.info("nats: reconnected")
            for client in clients:
                client.reconnected()

        nc = await connect(options, retry_for=retry_for, reconnected_cb=on_reconnect)
        clients.append(cls(nc, naming, owns_connection=True, **settings))
        return clients[0]

    async def close(self) -> None:
        if self._owns and not self.nc.is_closed:
            await self.nc.drain()

    async def __aenter__(self) -> CodingClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # ------------------------------------------------------------------------------------ tasks

    def build_task(
        self,
        prompt: str,
        *,
        workspace: str,
        session: str | None = None,
        continue_session: bool = True,
        git: GitSpec | dict[str, Any] | None = None,
        model: str | ModelRef | None = None,
        agent: str | None = None,
        timeout: float | None = None,
        task_id: str | None = None,
    ) -> Task:
        """Build a Station-format task (``timeout`` in seconds)."""
        task_id = task_id or str(uuid.uuid4())
        return Task(
            taskID=task_id,
            session=SessionSpec(name=session or f"session-{task_id[:8]}", **{"continue": continue_session}),
            workspace=WorkspaceSpec(
                name=workspace, git=GitSpec.model_validate(git) if isinstance(git, dict) else git
            ),
            prompt=prompt,
            timeout=int(timeout * 1000) if timeout else None,
            callback=TaskCallback(
                streamSubject=self.naming.stream_subject(task_id),
                resultSubject=self.naming.result_subject(task_id),
            ),
            agent=agent,
            model=ModelRef.parse(model) if isinstance(model, str) else model,
        )

    def _handle(self, task_id: str, stream_subject: str, result_subject: str, **extra: Any) -> TaskHandle:
        handle = TaskHandle(
            self, task_id, stream_subject, result_subject,
            max_buffered_events=self.max_buffered_events, max_buffered_bytes=self.max_buffered_bytes,
            late_event_grace=self.late_event_grace, presence_interval=self.presence_interval, **extra,
        )
        self._handles.add(handle)
        return handle

    def reconnected(self) -> None:
        """The NATS connection came back: results published meanwhile were lost on core NATS, so
        every open handle looks its task up (the result is in the task record)."""
        for handle in list(self._handles):
            handle.recheck()

    async def submit(self, prompt: str | Task, *, events: bool = True, **kwargs: Any) -> TaskHandle:
        """Publish a task and return its handle. Accepts a prompt (and :meth:`build_task` args) or a Task.

        ``events=False``: the handle does not follow the task's events until it is iterated (for
        callers that only want the result)."""
        task = prompt if isinstance(prompt, Task) else self.build_task(prompt, **kwargs)
        handle = self._handle(task.task_id, task.callback.stream_subject, task.callback.result_subject)
        await handle._subscribe(events=events)
        await self.nc.flush()
        try:
            # A ``client.submit`` span whose W3C context travels in the task's headers (tracing.py).
            with tracing.send_span("client.submit", {
                "messaging.destination.name": self.naming.task_subject, "ocbridge.task_id": task.task_id,
                "ocbridge.workspace": task.workspace.name, "ocbridge.session": task.session.name,
            }) as trace_headers:
                handle._submit_headers = trace_headers or None
                try:
                    ack = await self._publish_task(task, trace_headers)
                except NoStreamResponseError:
                    # No sidecar ever ran: create the stream so the task waits for one instead of being lost.
                    await ensure_task_stream(self._js, self.naming)
                    ack = await self._publish_task(task, trace_headers)
        except BaseException:
            await handle.close()
            raise
        handle._queued_at = (ack.stream, ack.seq)
        return handle

    async def _publish_task(self, task: Task, extra_headers: dict[str, str] | None = None) -> api.PubAck:
        # A JetStream publish confirms the task is stored (headers included); the message id
        # de-duplicates retries.
        return await self._js.publish(
            self.naming.task_subject, task.to_wire(), headers={**(extra_headers or {}), "Nats-Msg-Id": task.task_id},
            timeout=5,
        )

    async def run(self, prompt: str | Task, *, wait: float | None = None, **kwargs: Any) -> TaskResult:
        """Submit and wait for the result (``wait`` seconds at most). Events are not followed."""
        handle = await self.submit(prompt, events=False, **kwargs)
        try:
            return await handle.result(timeout=wait)
        finally:
            await handle.close()

    async def watch(self, task_id: str) -> TaskHandle:
        """A handle on a task submitted elsewhere; an already-decided result comes from the record.

        Raises :class:`TaskNotFound` when the task is neither queued nor recorded (never submitted,
        or finished so long ago that its record expired), instead of waiting for ever."""
        handle = self._handle(task_id, self.naming.stream_subject(task_id), self.naming.result_subject(task_id))
        await handle._subscribe()
        try:
            state, record = await handle._lookup()
        except BaseException:
            await handle.close()
            raise
        if state is TaskState.NOT_FOUND:
            await handle.close()
            raise TaskNotFound(task_id)
        handle._apply(state, record)
        return handle

    async def cancel(self, task_id: str, reason: str | None = None) -> None:
        """Cancel a task, whether it is running or still queued.

        The cancel is published live (a running task stops) and recorded as ``cancel.<taskID>`` in
        the state bucket (a queued task is dropped when a sidecar picks it up). The key expires after
        ``cancel_ttl`` seconds: per message when the bucket allows message TTLs (buckets made by
        nats-py do), else with the bucket's own TTL (Station's buckets: 7 days); in a bucket with
        neither, the sidecar deletes it when the task ends. Nothing is recorded for a task whose
        result is already decided."""
        body = CancelRequest(taskID=task_id, reason=reason).to_wire()
        try:
            if not await self._decided(task_id):
                await self._put_expiring(self.naming.state_bucket, cancel_key(task_id), body, self.cancel_ttl)
        except NotFoundError:
            pass  # no bucket yet: the live message below is all we can do
        await self.nc.publish(self.naming.cancel_subject(task_id), body)
        await self.nc.flush()

    async def _decided(self, task_id: str) -> bool:
        """Whether the task's record holds its result (read raw: spilled fields are not needed)."""
        try:
            data = await get_json(await self.tasks_bucket(), record_key(task_id))
        except NotFoundError:
            return False
        return bool(data and (data.get("result") is not None or data.get("state") in ("publishing", "done")))

    async def _put_expiring(self, bucket: str, key: str, value: bytes, ttl: float) -> None:
        """Put ``key`` so that it disappears after ``ttl`` seconds (see :meth:`cancel`)."""
        await self._store.put_expiring(bucket, key, value, ttl)

    async def task_record(self, task_id: str) -> TaskRecord | None:
        """The task's record (its result's spilled fields read back), or ``None`` when there is none
        (also when the tasks bucket does not exist yet). Raises ``ValidationError`` on a bad record."""
        try:
            kv = await self.tasks_bucket()
        except NotFoundError:
            return None
        data = await get_json(kv, record_key(task_id))
        if not data:
            return None
        if isinstance(data.get("result"), dict):
            data["result"] = await self.unspill(data["result"])
        return TaskRecord.model_validate(data)

    async def is_queued(self, task_id: str, where: tuple[str, int] | None = None) -> bool | None:
        """Whether the task waits (or runs, unacknowledged) in the task stream: ``None`` when that
        cannot be told (more than ``queue_scan_limit`` tasks queued, a stream that keeps acknowledged
        tasks, or no permission).

        ``where``: the (stream, sequence) the task was published at, when known; else the stream
        is searched."""
        return await self._store.is_queued(self.naming.task_subject, task_id, where,
                                           scan_limit=self.queue_scan_limit)

    # ------------------------------------------------------------------------------- spilling

    async def unspill(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload`` with its spilled fields read back from the object store (see
        :mod:`client.protocol.spill`). Never raises: a field whose object is missing, unreadable or
        not read within ``spill_timeout`` stays out and listed in ``spilled`` (and is logged)."""
        return await self._store.unspill(self.naming.object_store, payload, timeout=self.spill_timeout)

    # ------------------------------------------------------------------------------- operations

    async def op(self, request: GitOpRequest | dict[str, Any], *, timeout: float = 660.0) -> GitOpResult:
        """Run a workspace operation on a sidecar (open, close, branch, commit, push, status, diff).

        The default timeout covers a clone or push with the sidecar's default git timeouts. Spilled
        fields are read back (see :meth:`unspill`); a bad reply raises ``ValueError``.
        """
        if isinstance(request, dict):
            request = GitOpRequest.model_validate(request)
        with tracing.send_span("client.op", {"messaging.destination.name": self.naming.ops_subject,
                                             "ocbridge.op": request.op}) as trace_headers:
            reply = await self.nc.request(self.naming.ops_subject, request.to_wire(), timeout=timeout,
                                          headers=trace_headers or None)
        data = json.loads(reply.data)
        if not isinstance(data, dict):
            raise ValueError("the reply is not a JSON object")
        # A reply over the server's max_payload comes with its large fields in the object store.
        return GitOpResult.model_validate(await self.unspill(data))

    # ------------------------------------------------------------------------------------ files

    async def stage_file(self, task_id: str, name: str, data: bytes) -> str:
        """Stage an input file for a task (list ``name`` in the task's ``files``); returns its object name."""
        object_name = f"input/{task_id}/{name}"
        store = await self._js.object_store(self.naming.object_store)
        await store.put(object_name, data)
        return object_name

    async def artifact(self, name: str) -> bytes | None:
        """Read an object (e.g. a result's ``patch``, ``output/<taskID>/changes.patch``)."""
        store = await self._js.object_store(self.naming.object_store)
        try:
            return (await store.get(name)).data
        except NotFoundError:
            return None

    # --------------------------------------------------------------------------------- sessions

    async def list_sessions(self) -> list[SessionState]:
        kv = await self._bucket(self.naming.sessions_bucket)
        sessions = []
        for key in await list_keys(self._js, self.naming.sessions_bucket):
            data = await get_json(kv, key)
            if data is not None:
                try:
                    sessions.append(SessionState.model_validate(data))
                except ValueError:
                    continue
        return sorted(sessions, key=lambda s: s.last_used, reverse=True)

    async def get_session(self, name: str) -> SessionState | None:
        data = await get_json(await self._bucket(self.naming.sessions_bucket), kv_key(name))
        return SessionState.model_validate(data) if data else None

    async def delete_session(self, name: str) -> bool:
        kv = await self._bucket(self.naming.sessions_bucket)
        if await get_json(kv, kv_key(name)) is None:
            return False
        await kv.delete(kv_key(name))
        return True

    # ---------------------------------------------------------------------------------- buckets

    async def tasks_bucket(self) -> KeyValue:
        return await self._bucket(self.naming.tasks_bucket)

    async def _bucket(self, name: str) -> KeyValue:
        return await self._store.bucket(name)



__all__ = ["CodingClient", "TaskHandle", "TaskNotFound", "TaskState"]
