"""The sidecar's pipeline without NATS: run tasks and operations in-process.

Used by the client's ``opencode`` (HTTP), ``opencode-cli`` and ``claudecode`` backends. Sessions,
workspace records and files live in folders under ``config.data_dir``; events go to a callback.
The pipeline, the engines and the git layer are the sidecar's own, so results have the same shape.

Session leases live in ``<data_dir>/leases`` (file locks), so runners in several processes that
share a ``data_dir`` still run one task at a time per session.

Retries: where the sidecar gives a task back to JetStream (:class:`RetryTask`: the engine is
unavailable, a store is unreachable), the runner waits the delay asked for (at most 30 s; a cancel
ends the wait with a ``cancelled`` result) and runs it again, as the next ``attempt``, up to
``attempts`` runs in all; then the result is an error of the retry's kind (``engine_error``) that
says how many runs were tried. Each run has the task's full timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from ocbridge.bridge.config import BridgeConfig, ConfigError
from ocbridge.bridge.engines.base import Engine
from ocbridge.bridge.engines.factory import EngineHost
from ocbridge.bridge.pipeline.retry import RetryTask
from ocbridge.bridge.pipeline.runtime import Runtime, build_runtime
from ocbridge.bridge.redact import Redactor, default_redactor
from ocbridge.bridge.storage.stores import FolderArtifacts, FolderKeyValue, KeyValueStore
from ocbridge.client.protocol import (
    ErrorType,
    GitOpRequest,
    GitOpResult,
    SessionState,
    StreamEvent,
    Task,
    TaskResult,
    TaskStatus,
)

EventCallback = Callable[[StreamEvent], Awaitable[None]]

log = logging.getLogger(__name__)

_MAX_RETRY_DELAY = 30.0  # seconds between runs of a task at most, whatever the retry asks
_DEFAULT_RETRY_DELAY = 5.0  # seconds before running again when the retry names no delay


class LocalRunner:
    """``async with LocalRunner(config) as runner: result = await runner.run(task)``."""

    def __init__(
        self,
        config: BridgeConfig,
        *,
        engine: Engine | None = None,
        redactor: Redactor | None = None,
        leases: KeyValueStore | None = None,
        attempts: int = 3,
    ):
        """``leases``: where session leases live (default: a folder under ``data_dir``);
        ``attempts``: runs of a task at most when runs end with :class:`RetryTask`."""
        self.config = config
        self.redactor = redactor or default_redactor
        self.engine = engine
        self.attempts = max(attempts, 1)
        self._leases = leases
        self._runtime: Runtime | None = None
        self._host: EngineHost | None = None
        self._listeners: dict[str, EventCallback] = {}
        self._cancels: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        config = self.config
        if config.agent_user:
            # The user switch needs a root sidecar with a private data_dir: not a library call's job.
            raise ConfigError("agent_user is a setting of `ocbridge serve`; the in-process runner "
                              "runs the agent as the calling user")
        data = config.data_dir.resolve()
        self._host = EngineHost(config, data_dir=data, engine=self.engine)
        try:
            self.engine = await self._host.start()
        except BaseException:
            await self.aclose()
            raise
        self._runtime = build_runtime(
            config,
            self.engine,
            publish=self._publish,
            sessions=FolderKeyValue(data / "sessions"),
            state=FolderKeyValue(data / "state"),
            artifacts=FolderArtifacts(data / "files"),
            redactor=self.redactor,
            leases=self._leases if self._leases is not None else FolderKeyValue(data / "leases"),
        )

    async def aclose(self) -> None:
        if self._host is not None:
            await self._host.aclose()
            self._host = None

    async def __aenter__(self) -> LocalRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("LocalRunner is not started")
        return self._runtime

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        listener = self._listeners.get(subject)
        if listener is not None:
            await listener(StreamEvent.from_wire(data))

    async def run(self, task: Task, on_event: EventCallback | None = None) -> TaskResult:
        """Run ``task`` to its result; ``on_event`` receives the live events."""
        subject = task.callback.stream_subject
        if on_event is not None:
            self._listeners[subject] = on_event
        cancel = self._cancels[task.task_id] = asyncio.Event()
        try:
            result = await self._run(task, cancel)
        finally:
            self._listeners.pop(subject, None)
            self._cancels.pop(task.task_id, None)
        # The same redaction as on the wire, so in-process callers see what Station would.
        return TaskResult.model_validate(self.redactor.data(result.to_dict()))

    async def _run(self, task: Task, cancel: asyncio.Event) -> TaskResult:
        pipeline = self.runtime.pipeline
        attempt = 1
        while True:
            try:
                return await pipeline.run(task, cancel, attempt=attempt)
            except RetryTask as exc:
                if attempt >= self.attempts:
                    log.warning("task %s: giving up after %d runs: %s", task.task_id, attempt, exc.message)
                    return pipeline.error_result(
                        task, f"{exc.message} (gave up after {attempt} runs)", exc.error_type
                    )
                delay = min(exc.retry_after if exc.retry_after is not None else _DEFAULT_RETRY_DELAY,
                            _MAX_RETRY_DELAY)
                log.info("task %s: run %d not completed (%s); again in %.1fs", task.task_id, attempt,
                         exc.message, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(cancel.wait(), delay)
                if cancel.is_set():
                    return pipeline.error_result(task, "task cancelled", ErrorType.CANCELLED, TaskStatus.CANCELLED)
                attempt += 1

    def cancel(self, task_id: str) -> bool:
        """Stop a running task (its result then has status ``cancelled``)."""
        event = self._cancels.get(task_id)
        if event is None:
            return False
        event.set()
        return True

    async def op(self, request: GitOpRequest) -> GitOpResult:
        result = await self.runtime.ops.handle(request)
        return GitOpResult.model_validate(self.redactor.data(result.to_dict()))

    async def sessions(self) -> list[SessionState]:
        return await self.runtime.sessions.all()
