"""``opencode-nats``: coding work goes over NATS to the sidecars (Station's default transport).

Prompt tasks travel exactly as Station publishes them (:class:`~client.client.CodingClient`);
workspace operations (open, close, branch, commit, push...) are core-NATS requests on
``<task subject>.ops`` answered by any sidecar of the queue group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import BucketNotFoundError

from ocbridge.client.client import CodingClient
from ocbridge.client.connection import NatsOptions
from ocbridge.client.handle import TaskNotFound
from ocbridge.client.protocol import (
    GitOpRequest,
    GitOpResult,
    Naming,
    OcbridgeError,
    SessionState,
    Task,
    TaskCallback,
    TaskResult,
    TaskStatus,
)

from .base import CodingBackend, EventCallback

log = logging.getLogger(__name__)


class BackendError(OcbridgeError, RuntimeError):
    """The backend could not be reached or did not answer (not a failure of the work itself)."""


class NatsBackend(CodingBackend):
    """Talks to sidecars through NATS.

    ``op_timeout`` bounds a quick operation; ``open`` may clone and ``push`` may upload for minutes,
    so they get ``clone_timeout`` / ``push_timeout`` on top. A task's result is awaited for its own
    timeout plus ``result_grace`` (the sidecar reports its timeout itself, as a ``timeout`` result).
    When no sidecar listens on the ops subject yet, a request is retried ``max_attempts`` times.
    """

    name = "opencode-nats"

    def __init__(
        self,
        options: NatsOptions,
        naming: Naming | None = None,
        *,
        op_timeout: float = 60.0,
        clone_timeout: float = 600.0,
        push_timeout: float = 300.0,
        result_grace: float = 60.0,
        default_task_timeout: float = 600.0,
        max_attempts: int = 3,
        client: CodingClient | None = None,
    ) -> None:
        self.options = options
        self.naming = naming or Naming()
        self.op_timeout = op_timeout
        self.clone_timeout = clone_timeout
        self.push_timeout = push_timeout
        self.result_grace = result_grace
        self.default_task_timeout = default_task_timeout
        self.max_attempts = max_attempts
        self._client = client

    @property
    def client(self) -> CodingClient:
        if self._client is None:
            raise BackendError("the opencode-nats backend is not started")
        return self._client

    async def start(self) -> None:
        if self._client is None:
            try:
                self._client = await CodingClient.connect(self.options, naming=self.naming)
            except Exception as exc:
                raise BackendError(f"cannot connect to NATS at {self.options.url}: {exc}") from exc

    async def aclose(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None

    # ------------------------------------------------------------------------------------ tasks

    async def run(self, task: Task, on_event: EventCallback | None = None) -> TaskResult:
        """Publish ``task`` and follow it to its result; on a missing result the task is cancelled."""
        client = self.client
        # The subjects belong to this backend's naming, whoever built the task.
        task = task.model_copy(update={"callback": TaskCallback(
            streamSubject=self.naming.stream_subject(task.task_id),
            resultSubject=self.naming.result_subject(task.task_id),
        )})
        timeout = (task.timeout / 1000 if task.timeout else self.default_task_timeout) + self.result_grace
        handle = await client.submit(task)
        try:
            async for event in handle.events(timeout=timeout):
                if on_event is not None:
                    await on_event(event)
            return await handle.result(timeout=5)
        except TimeoutError:
            try:
                await handle.cancel("no result in time")
            except Exception as exc:  # the timeout result below is what matters; say why no cancel
                log.warning("task %s: cancelling after the timeout failed: %s", task.task_id, exc)
            return TaskResult(
                taskID=task.task_id, status=TaskStatus.TIMEOUT,
                error=f"no result from any sidecar within {timeout:.0f}s", errorType="timeout",
            )
        except TaskNotFound as exc:
            # The task left the queue without a record (e.g. the stream was purged): it will not run.
            return TaskResult(taskID=task.task_id, status=TaskStatus.ERROR, error=str(exc), errorType=exc.error_type)
        except asyncio.CancelledError:
            # Whoever called us gave up (e.g. the MCP client cancelled the tool call): stop the work.
            try:
                await asyncio.shield(handle.cancel("caller cancelled"))
            except Exception as exc:
                log.warning("task %s: cancelling for the caller failed: %s", task.task_id, exc)
            raise
        finally:
            await handle.close()

    # ------------------------------------------------------------------------------- operations

    def op_timeout_for(self, request: GitOpRequest) -> float:
        """Seconds to wait for the reply to ``request``."""
        if request.op == "open" and request.git is not None:
            return self.op_timeout + self.clone_timeout
        if request.op == "push":
            return self.op_timeout + self.push_timeout
        return self.op_timeout

    async def op(self, request: GitOpRequest) -> GitOpResult:
        """Send an operation to a sidecar and return its reply.

        A reply larger than the server's ``max_payload`` arrives with its large fields (``changes``,
        ``patch``...) in the object store; they are read back here (:meth:`CodingClient.unspill`),
        and one that cannot be read stays listed in the reply's ``spilled``.

        Raises :class:`BackendError` when no sidecar answers: the operation may or may not have run,
        which is different from a failure the sidecar reports (``ok: false``)."""
        subject = self.naming.ops_subject
        timeout = self.op_timeout_for(request)
        for attempt in range(1, self.max_attempts + 1):
            try:
                return await self.client.op(request, timeout=timeout)
            except NoRespondersError:
                # Nobody listens yet (sidecar starting or restarting): nothing ran, safe to retry.
                if attempt == self.max_attempts:
                    raise BackendError(
                        f"{request.op}: no sidecar answers on {subject} (is 'ocbridge serve' running "
                        "with the same task subject?)"
                    ) from None
                await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
            except NatsTimeoutError:
                # Not retried: the sidecar may still be doing it (a slow clone or push).
                raise BackendError(f"{request.op}: no reply from the sidecar within {timeout:.0f}s") from None
            except ValueError as exc:
                raise BackendError(f"{request.op}: unreadable reply from the sidecar: {exc}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def sessions(self) -> list[SessionState]:
        """Sessions in the sessions bucket, most recently used first (none when it does not exist)."""
        try:
            return await self.client.list_sessions()
        except BucketNotFoundError:
            return []  # no sidecar ever ran on this naming: no sessions
        except NatsTimeoutError:
            raise BackendError("listing sessions: no answer from NATS JetStream") from None
