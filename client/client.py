"""``CodingClient``: the Station-side API for submitting coding tasks to sidecars over NATS."""

from __future__ import annotations

import uuid
from typing import Any

from nats.aio.client import Client as NATS
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

from .connection import NatsOptions, connect
from .handle import TaskHandle
from .kv import get_json, list_keys
from .streams import ensure_task_stream


class CodingClient:
    """Connects to NATS and talks to the sidecars.

    ::

        async with await CodingClient.connect("nats://127.0.0.1:4222") as client:
            handle = await client.submit("create hello.txt with content hi", workspace="demo")
            async for event in handle:
                print(event.type, event.content)
            result = await handle.result(timeout=60)
    """

    def __init__(self, nc: NATS, naming: Naming | None = None, *, owns_connection: bool = False) -> None:
        self.nc = nc
        self.naming = naming or Naming()
        self._owns = owns_connection
        self._js = nc.jetstream()
        self._buckets: dict[str, KeyValue] = {}

    @classmethod
    async def connect(
        cls, url: str | NatsOptions | None = None, *, naming: Naming | None = None, retry_for: float = 10.0
    ) -> CodingClient:
        """Connect (retrying for ``retry_for`` seconds) and return a client that owns the connection."""
        options = url if isinstance(url, NatsOptions) else NatsOptions(url=url, name="ocbridge-client")
        nc = await connect(options, retry_for=retry_for)
        return cls(nc, naming, owns_connection=True)

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

    async def submit(self, prompt: str | Task, **kwargs: Any) -> TaskHandle:
        """Publish a task and return its handle. Accepts a prompt (and :meth:`build_task` args) or a Task."""
        task = prompt if isinstance(prompt, Task) else self.build_task(prompt, **kwargs)
        handle = TaskHandle(
            self, task.task_id, task.callback.stream_subject, task.callback.result_subject
        )
        await handle._subscribe()
        await self.nc.flush()
        try:
            try:
                await self._publish_task(task)
            except NoStreamResponseError:
                # No sidecar ever ran: create the stream so the task waits for one instead of being lost.
                await ensure_task_stream(self._js, self.naming)
                await self._publish_task(task)
        except BaseException:
            await handle.close()
            raise
        return handle

    async def _publish_task(self, task: Task) -> None:
        # A JetStream publish confirms the task is stored; the message id de-duplicates retries.
        await self._js.publish(
            self.naming.task_subject, task.to_wire(), headers={"Nats-Msg-Id": task.task_id}, timeout=5
        )

    async def run(self, prompt: str | Task, *, wait: float | None = None, **kwargs: Any) -> TaskResult:
        """Submit and wait for the result (``wait`` seconds at most)."""
        handle = await self.submit(prompt, **kwargs)
        try:
            return await handle.result(timeout=wait)
        finally:
            await handle.close()

    async def watch(self, task_id: str) -> TaskHandle:
        """A handle on a task submitted elsewhere; already-published results come from the record."""
        handle = TaskHandle(
            self, task_id, self.naming.stream_subject(task_id), self.naming.result_subject(task_id)
        )
        await handle._subscribe()
        await handle._check_record()
        return handle

    async def cancel(self, task_id: str, reason: str | None = None) -> None:
        """Cancel a task, whether it is running or still queued."""
        body = CancelRequest(taskID=task_id, reason=reason).to_wire()
        # Recorded so a sidecar that picks the task up later still sees the cancel.
        try:
            state = await self._bucket(self.naming.state_bucket)
            await state.put(cancel_key(task_id), body)
        except NotFoundError:
            pass  # no bucket yet: the live message below is all we can do
        await self.nc.publish(self.naming.cancel_subject(task_id), body)
        await self.nc.flush()

    async def task_record(self, task_id: str) -> TaskRecord | None:
        data = await get_json(await self.tasks_bucket(), record_key(task_id))
        return TaskRecord.model_validate(data) if data else None

    # ------------------------------------------------------------------------------- operations

    async def op(self, request: GitOpRequest | dict[str, Any], *, timeout: float = 660.0) -> GitOpResult:
        """Run a workspace operation on a sidecar (open, close, branch, commit, push, status, diff).

        The default timeout covers a clone or push with the sidecar's default git timeouts.
        """
        if isinstance(request, dict):
            request = GitOpRequest.model_validate(request)
        reply = await self.nc.request(self.naming.ops_subject, request.to_wire(), timeout=timeout)
        return GitOpResult.from_wire(reply.data)

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
        if name not in self._buckets:
            self._buckets[name] = await self._js.key_value(name)
        return self._buckets[name]



__all__ = ["CodingClient", "TaskHandle"]
