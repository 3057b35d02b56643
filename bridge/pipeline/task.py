"""Run one task: workspace, git, session, prompt, live events, changes, one result.

The pipeline knows nothing about JetStream (the worker acks and redelivers) and nothing about a
particular agent (the engine does). It owns Station's event order, the timeout and cancellation,
the session lease and record, the change report and the shape of the result.

One deadline (the task's ``timeout``) covers every phase: the wait for the session lease, the
workspace (clone or pull, input files), the prompt, the change report and the patch. A cancel or
the deadline stops the task in any phase within moments: while the prompt runs, the agent is
aborted and what it did so far is reported; in any other phase the step is cancelled (a git
process is killed). Failures that are not the task's fault raise :class:`RetryTask` instead of
giving a result (see :func:`retry_for`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from ocbridge.bridge.config import BridgeConfig
from ocbridge.bridge.engines.base import AgentEvent, Engine, PromptRequest, RunOutcome
from ocbridge.bridge.logs import log_fields, logged_suppress
from ocbridge.bridge.observability import tracing
from ocbridge.bridge.observability.metrics import NO_METRICS, TaskMetrics
from ocbridge.bridge.redact import Redactor
from ocbridge.bridge.storage.sessions import SessionStore
from ocbridge.bridge.workspace.janitor import WorkspaceJanitor
from ocbridge.bridge.workspace.paths import Workspace
from ocbridge.bridge.workspace.prepare import WorkspaceFlow
from ocbridge.client.protocol import (
    ErrorType,
    EventSession,
    EventType,
    OcbridgeError,
    SessionGit,
    SessionState,
    Task,
    TaskResult,
    TaskStatus,
    error_type_of,
    iso_now,
)

from .emitter import EventEmitter, Publish
from .progress import Progress
from .retry import RetryTask, retry_for, unless_unavailable
from .stopping import LEASE_LOST, Stop, reap, relay

if TYPE_CHECKING:
    from ocbridge.bridge.agent_tools import AgentToolsServer

log = logging.getLogger(__name__)

#: Seconds a stopped task gets to collect its changes after the agent was aborted (on top of
#: twice ``abort_grace``), and a cancelled step to clean up; then it is left behind.
_WRAP_UP = 10.0

class TaskPipeline:
    """Turns a :class:`Task` into a :class:`TaskResult`, publishing live events on the way."""

    def __init__(
        self,
        *,
        publish: Publish,
        engine: Engine,
        sessions: SessionStore,
        flow: WorkspaceFlow,
        janitor: WorkspaceJanitor,
        config: BridgeConfig,
        redactor: Redactor,
        metrics: TaskMetrics = NO_METRICS,
        agent_tools: AgentToolsServer | None = None,
    ) -> None:
        self._publish = publish
        self._agent_tools = agent_tools
        self._engine = engine
        self._sessions = sessions
        self._flow = flow
        self._janitor = janitor
        self._config = config
        self._redactor = redactor
        self._metrics = metrics

    async def run(
        self, task: Task, cancel: asyncio.Event, *, attempt: int = 1, delivery: str | None = None
    ) -> TaskResult:
        """Run ``task`` to its single result; its events carry ``attempt`` (the delivery).
        ``delivery`` names the task message, the same for all its deliveries: a later attempt may
        carry on an earlier one's interrupted agent run (the OpenCode engine does).

        ``cancel`` being set stops it with ``cancelled``, its deadline with ``timeout``, in any
        phase. Raises :class:`RetryTask`, with no result, when the failure is not the task's fault
        (:func:`retry_for`; also a lost session lease): the caller runs it again later, as
        ``attempt + 1``. A cancellation of this call (shutdown) aborts the agent and propagates.

        Runs in the task's trace span (the worker's, else a new one) with the task's log fields.
        """
        with (
            log_fields(task_id=task.task_id, session=task.session.name, workspace=task.workspace.name,
                       attempt=attempt),
            tracing.task_span(task.task_id, engine=self._config.engine),
        ):
            result = await self._run_task(task, cancel, attempt, delivery)
            tracing.describe_task(task, result, attempt=attempt, model=tracing.configured_model(self._config))
            return result

    async def _run_task(self, task: Task, cancel: asyncio.Event, attempt: int, delivery: str | None) -> TaskResult:
        started = time.monotonic()
        emitter = EventEmitter(
            self._publish,
            task.callback.stream_subject,
            task.task_id,
            self._redactor,
            flush_interval=self._config.text_flush_interval,
            attempt=attempt,
            headers=tracing.trace_headers(),
        )
        progress = Progress(attempt=attempt, delivery=delivery)
        status, error = TaskStatus.COMPLETED, None
        error_type: ErrorType | str | None = None
        retry: RetryTask | None = None
        try:
            status = await self._run_bounded(task, cancel, emitter, progress)
            outcome = progress.outcome
            if status == TaskStatus.COMPLETED and outcome.error:
                status, error = TaskStatus.ERROR, outcome.error
                error_type = outcome.error_type or ErrorType.ENGINE_ERROR
            elif status == TaskStatus.TIMEOUT:
                error, error_type = f"task timed out after {self._timeout(task):.0f}s", ErrorType.TIMEOUT
            elif status == TaskStatus.CANCELLED:
                error, error_type = "task cancelled", ErrorType.CANCELLED
        except asyncio.CancelledError:
            # The sidecar is shutting down past its grace period: stop the agent, let the worker
            # hand the task back for redelivery (no result from this attempt).
            if progress.session_id and progress.workspace:
                with logged_suppress(f"task {task.task_id}: aborting the agent on shutdown", log):
                    await asyncio.wait_for(
                        asyncio.shield(self._engine.abort(progress.workspace.path, progress.session_id)), 5
                    )
            raise
        except Exception as exc:
            retry = retry_for(exc)
            if retry is not None:
                pass
            elif isinstance(exc, OcbridgeError):
                status, error, error_type = TaskStatus.ERROR, exc.message, exc.error_type
            else:
                log.exception("task %s failed unexpectedly", task.task_id)
                status, error, error_type = TaskStatus.ERROR, f"internal error: {exc}", error_type_of(exc)
        finally:
            if progress.workspace is not None:
                with logged_suppress(f"task {task.task_id}: releasing the engine's workspace", log):
                    await self._engine.release(progress.workspace.path)

        if retry is not None:
            log.warning("task %s (attempt %d) to be retried: %s",
                        task.task_id, attempt, self._redactor.text(retry.message))
            with logged_suppress(f"task {task.task_id}: publishing the last events", log):
                await emitter.aclose()
            raise retry
        with logged_suppress(f"task {task.task_id}: publishing the last events", log):
            await emitter.flush(final=True)  # all the text, before the error event
            if error is not None and status == TaskStatus.ERROR:
                await emitter.emit(EventType.ERROR, content=self._redactor.text(error))
            await emitter.aclose()
        result = progress.result(task, status, error, error_type, emitter, started)
        if delivery is not None:
            self._flow.forget_baseline(delivery)
        if progress.workspace is not None:
            with logged_suppress(f"task {task.task_id}: workspace clean-up", log):
                await self._janitor.after_task(progress.workspace.path, status == TaskStatus.COMPLETED)
        return result

    def error_result(
        self, task: Task, error: str, error_type: ErrorType | str, status: TaskStatus = TaskStatus.ERROR
    ) -> TaskResult:
        """A result of the usual shape for a task that could not run (e.g. its retries gave up)."""
        return Progress().result(task, status, error, error_type, None, time.monotonic())

    # ------------------------------------------------------------------------------ the steps

    async def _run_bounded(
        self, task: Task, cancel: asyncio.Event, emitter: EventEmitter, progress: Progress
    ) -> TaskStatus:
        """Run the task's steps until they end, the deadline passes, or ``cancel`` is set."""
        stop = Stop()
        timer = asyncio.get_running_loop().call_later(self._timeout(task), stop.set, TaskStatus.TIMEOUT.value)
        relaying = asyncio.create_task(relay(cancel, stop))
        body = asyncio.create_task(
            self._steps(task, stop, emitter, progress), name=f"ocbridge-task-{task.task_id}"
        )
        interrupted = False
        try:
            stopper = asyncio.create_task(stop.event.wait())
            try:
                await asyncio.wait({body, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
            if not body.done() and progress.phase == "prompt":
                # The prompt aborts the agent itself and the changes so far are collected.
                await asyncio.wait({body}, timeout=2 * self._config.abort_grace + _WRAP_UP)
            if not body.done():
                interrupted = True
                log.info("task %s: %s while in phase %s", task.task_id, stop.reason, progress.phase)
        finally:
            timer.cancel()
            relaying.cancel()
            if not body.done():  # interrupted, or this call is cancelled (shutdown)
                body.cancel()
                await asyncio.wait({body}, timeout=_WRAP_UP)
                if not body.done():
                    log.warning("task %s: its %s step did not stop within %.0fs", task.task_id,
                                progress.phase, _WRAP_UP)
        if interrupted or body.cancelled():
            if body.done() and not body.cancelled() and body.exception() is not None:
                log.debug("task %s: stopped step failed: %r", task.task_id, body.exception())
            if stop.reason is None:
                raise RuntimeError("the task's steps were cancelled from outside")
            return stop.status()
        return body.result()

    async def _steps(self, task: Task, stop: Stop, emitter: EventEmitter, progress: Progress) -> TaskStatus:
        progress.phase = "lease"
        async with contextlib.AsyncExitStack() as held:
            with tracing.span("session.lease"):  # the wait for the session's lease
                await held.enter_async_context(self._sessions.lease(
                    task.session.name, owner=f"task {task.task_id}", on_lost=lambda: stop.set(LEASE_LOST)
                ))
            progress.phase = "prepare"
            return await self._run_locked(task, stop, emitter, progress)

    async def _run_locked(
        self, task: Task, stop: Stop, emitter: EventEmitter, progress: Progress
    ) -> TaskStatus:
        spec = task.workspace
        with contextlib.ExitStack() as using:
            with tracing.span("workspace.prepare") as preparing:
                workspace = progress.workspace = self._flow.open(spec.name)
                if preparing.is_recording():
                    preparing.set_attributes({"workspace.name": spec.name, "workspace.path": str(workspace.path),
                                              "workspace.created": workspace.created, "workspace.git": bool(spec.git)})
                await emitter.emit(
                    EventType.WORKSPACE_CREATED if workspace.created else EventType.WORKSPACE_REUSED,
                    content=str(workspace.path),
                )
                await self._janitor.touch(workspace.path, policy=spec.cleanup, scope=spec.scope,
                                          scope_id=spec.scope_id)
                using.enter_context(self._janitor.using(workspace.path))
                if spec.git is not None:
                    progress.repo = await self._flow.clone_or_pull(workspace, spec.git, emitter.emit)
                if task.files:
                    await self._flow.place_inputs(task.task_id, workspace, task.files)
                baseline = await self._flow.baseline(workspace, delivery=progress.delivery,
                                                     attempt=progress.attempt)

            state = await self._open_session(task, workspace, emitter, progress)
            if stop.event.is_set():
                return stop.status()
            progress.phase = "prompt"
            await emitter.emit(EventType.PROMPT_SENT, content=task.prompt)
            request = PromptRequest(
                directory=workspace.path, session_id=state.opencode_id, prompt=task.prompt,
                model=task.model, agent=task.agent, delivery=progress.delivery, attempt=progress.attempt,
            )
            # The agent's Station tools (MCP), with a token that dies with the run.
            grant = self._agent_tools.for_task(task, workspace.path, self._engine) if self._agent_tools else None
            async with grant or contextlib.nullcontext() as tools:
                request.tools = tools
                status = await self._prompt(request, task, stop, emitter, progress)
            progress.phase = "finish"

            outcome = progress.outcome
            if outcome.session_id:  # a CLI engine created the session during the run
                state.opencode_id = progress.session_id = outcome.session_id
            with tracing.span("workspace.changes") as collecting:
                progress.changes = await self._flow.changes(workspace, baseline)
                # The agent's work is done: NATS being briefly unreachable now costs the patch or the
                # session record's update (logged), not a second run of the prompt.
                with unless_unavailable(f"task {task.task_id}: storing the patch"):
                    progress.patch = await self._flow.store_patch(task.task_id, progress.changes)
                if collecting.is_recording():
                    collecting.set_attributes({"workspace.changed_files": len(progress.changes.changes or []),
                                               "workspace.patch": progress.patch is not None})
            state.message_count = outcome.message_count or state.message_count + 1
            state.last_used = iso_now()
            if progress.repo is not None or progress.changes.git:
                state.git = SessionGit(
                    url=progress.repo.url if progress.repo else (state.git.url if state.git else None),
                    branch=progress.changes.branch,
                    lastCommit=progress.changes.commit,
                )
            progress.message_count = state.message_count
            with unless_unavailable(f"task {task.task_id}: updating the session record"):
                await self._sessions.put(state)
            return status

    async def _open_session(
        self, task: Task, workspace: Workspace, emitter: EventEmitter, progress: Progress
    ) -> SessionState:
        with tracing.span("session.resolve") as resolving:
            state, reused = await self._sessions.open_or_continue(
                self._engine, name=task.session.name, workspace_name=task.workspace.name, path=workspace.path,
                reuse=task.session.reuse,
            )
            if resolving.is_recording():
                resolving.set_attributes({"session.name": task.session.name, "session.reused": reused,
                                          "session.id": state.opencode_id or ""})
        progress.session_id = state.opencode_id
        await emitter.emit(
            EventType.SESSION_REUSED if reused else EventType.SESSION_CREATED,
            session=EventSession(name=task.session.name, opencodeID=state.opencode_id or None),
        )
        return state

    async def _prompt(
        self,
        request: PromptRequest,
        task: Task,
        stop: Stop,
        emitter: EventEmitter,
        progress: Progress,
    ) -> TaskStatus:
        """Run the prompt until it ends or the task must stop (then the agent is aborted)."""
        tools = tracing.ToolSpans.for_current_task()  # None unless traced

        async def on_event(event: AgentEvent) -> None:
            if event.kind == "text":
                await emitter.delta(EventType.TEXT, event.content or "")
            elif event.kind == "thinking":
                await emitter.delta(EventType.THINKING, event.content or "")
            elif event.kind == "tool_start" and event.tool is not None:
                if tools is not None:
                    tools.start(event.tool.call_id, event.tool.name, event.started_at)
                await emitter.tool(EventType.TOOL_START, event.tool)
            elif event.kind == "tool_end" and event.tool is not None:
                if tools is not None:
                    tools.end(event.tool.call_id, event.tool.name, started_at=event.started_at,
                              ended_at=event.ended_at, duration_ms=event.tool.duration, error=event.tool.error)
                await emitter.tool(EventType.TOOL_END, event.tool)

        if stop.event.is_set():
            return stop.status()
        with tracing.span(f"{tracing.task_prefix()}.prompt") as prompting:
            if prompting.is_recording():
                model = request.model or tracing.configured_model(self._config)
                prompting.set_attributes({"session.id": request.session_id, "prompt.agent": request.agent or "",
                                          "prompt.model": str(model or "")})
            run = asyncio.create_task(self._engine.run(request, self._metrics.first_event(on_event)))
            stopper = asyncio.create_task(stop.event.wait())
            try:
                await asyncio.wait({run, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if run.done():
                    progress.outcome = run.result()
                    return TaskStatus.COMPLETED
                log.info("task %s: %s, aborting the agent", task.task_id, stop.reason)
                if prompting.is_recording():
                    prompting.add_event("abort", {"reason": str(stop.reason)})
                progress.outcome = await self._abort(request, run)
                return stop.status()
            finally:
                stopper.cancel()
                if not run.done():
                    await reap(run)
                if tools is not None:
                    tools.close()

    async def _abort(self, request: PromptRequest, run: asyncio.Task[RunOutcome]) -> RunOutcome:
        grace = self._config.abort_grace
        try:
            await asyncio.wait_for(self._engine.abort(request.directory, request.session_id), grace)
        except Exception as exc:
            log.warning("abort of session %s failed: %s", request.session_id, exc)
        try:
            return await asyncio.wait_for(asyncio.shield(run), grace)
        except Exception as exc:
            log.info("session %s: no outcome after the abort (%s)", request.session_id, type(exc).__name__)
            return RunOutcome(aborted=True)

    def _timeout(self, task: Task) -> float:
        return task.timeout / 1000 if task.timeout else self._config.default_task_timeout
