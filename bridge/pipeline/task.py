"""Run one task: workspace, git, session, prompt, live events, changes, one result.

The pipeline knows nothing about JetStream (the worker acks and redelivers) and nothing about a
particular agent (the engine does). It owns Station's event order, the timeout and cancellation,
the session record, the change report and the shape of the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from ocbridge.bridge.config import BridgeConfig
from ocbridge.bridge.engines.base import AgentEvent, Engine, PromptRequest, RunOutcome
from ocbridge.bridge.redact import Redactor
from ocbridge.bridge.storage.sessions import SessionStore
from ocbridge.bridge.workspace.git import ChangeSet, RepoState
from ocbridge.bridge.workspace.janitor import WorkspaceJanitor
from ocbridge.bridge.workspace.paths import Workspace
from ocbridge.bridge.workspace.prepare import WorkspaceFlow
from ocbridge.client.protocol import (
    ErrorType,
    EventSession,
    EventType,
    OcbridgeError,
    ResultMetrics,
    ResultSession,
    ResultWorkspace,
    SessionGit,
    SessionState,
    Task,
    TaskResult,
    TaskStatus,
    error_type_of,
    iso_now,
)

from .emitter import EventEmitter, Publish

log = logging.getLogger(__name__)


@dataclass
class _Progress:
    """What is known about a task so far, for the result whatever way it ends."""

    workspace: Workspace | None = None
    repo: RepoState | None = None
    session_id: str | None = None
    message_count: int | None = None
    outcome: RunOutcome = field(default_factory=RunOutcome)
    changes: ChangeSet | None = None
    patch: str | None = None


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
    ) -> None:
        self._publish = publish
        self._engine = engine
        self._sessions = sessions
        self._flow = flow
        self._janitor = janitor
        self._config = config
        self._redactor = redactor

    async def run(self, task: Task, cancel: asyncio.Event) -> TaskResult:
        """Run ``task`` to its single result. ``cancel`` being set stops it with ``cancelled``."""
        started = time.monotonic()
        emitter = EventEmitter(
            self._publish,
            task.callback.stream_subject,
            task.task_id,
            self._redactor,
            flush_interval=self._config.text_flush_interval,
        )
        progress = _Progress()
        status, error = TaskStatus.COMPLETED, None
        error_type: ErrorType | str | None = None
        try:
            async with self._sessions.lock(task.session.name):
                status = await self._run_locked(task, cancel, emitter, progress)
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
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        asyncio.shield(self._engine.abort(progress.workspace.path, progress.session_id)), 5
                    )
            raise
        except OcbridgeError as exc:
            status, error, error_type = TaskStatus.ERROR, exc.message, exc.error_type
        except Exception as exc:
            log.exception("task %s failed unexpectedly", task.task_id)
            status, error, error_type = TaskStatus.ERROR, f"internal error: {exc}", error_type_of(exc)
        finally:
            if progress.workspace is not None:
                with contextlib.suppress(Exception):
                    await self._engine.release(progress.workspace.path)

        if error is not None and status == TaskStatus.ERROR:
            with contextlib.suppress(Exception):
                await emitter.emit(EventType.ERROR, content=self._redactor.text(error))
        with contextlib.suppress(Exception):
            await emitter.flush()
        result = self._result(task, status, error, error_type, progress, emitter, started)
        if progress.workspace is not None:
            with contextlib.suppress(Exception):
                await self._janitor.after_task(progress.workspace.path, status == TaskStatus.COMPLETED)
        return result

    # ------------------------------------------------------------------------------ the steps

    async def _run_locked(
        self, task: Task, cancel: asyncio.Event, emitter: EventEmitter, progress: _Progress
    ) -> TaskStatus:
        spec = task.workspace
        workspace = progress.workspace = self._flow.open(spec.name)
        await emitter.emit(
            EventType.WORKSPACE_CREATED if workspace.created else EventType.WORKSPACE_REUSED,
            content=str(workspace.path),
        )
        await self._janitor.touch(workspace.path, policy=spec.cleanup, scope=spec.scope, scope_id=spec.scope_id)
        with self._janitor.using(workspace.path):
            if spec.git is not None:
                progress.repo = await self._flow.clone_or_pull(workspace, spec.git, emitter.emit)
            if task.files:
                await self._flow.place_inputs(task.task_id, workspace, task.files)
            baseline = await self._flow.baseline(workspace)

            state = await self._open_session(task, workspace, emitter, progress)
            if cancel.is_set():
                return TaskStatus.CANCELLED
            await emitter.emit(EventType.PROMPT_SENT, content=task.prompt)
            request = PromptRequest(
                directory=workspace.path, session_id=state.opencode_id, prompt=task.prompt,
                model=task.model, agent=task.agent,
            )
            status = await self._prompt(request, task, cancel, emitter, progress)

            outcome = progress.outcome
            if outcome.session_id:  # a CLI engine created the session during the run
                state.opencode_id = progress.session_id = outcome.session_id
            progress.changes = await self._flow.changes(workspace, baseline)
            progress.patch = await self._flow.store_patch(task.task_id, progress.changes)
            state.message_count = outcome.message_count or state.message_count + 1
            state.last_used = iso_now()
            if progress.repo is not None or progress.changes.git:
                state.git = SessionGit(
                    url=progress.repo.url if progress.repo else (state.git.url if state.git else None),
                    branch=progress.changes.branch,
                    lastCommit=progress.changes.commit,
                )
            progress.message_count = state.message_count
            await self._sessions.put(state)
            return status

    async def _open_session(
        self, task: Task, workspace: Workspace, emitter: EventEmitter, progress: _Progress
    ) -> SessionState:
        state, reused = await self._sessions.open_or_continue(
            self._engine, name=task.session.name, workspace_name=task.workspace.name, path=workspace.path,
            reuse=task.session.reuse,
        )
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
        cancel: asyncio.Event,
        emitter: EventEmitter,
        progress: _Progress,
    ) -> TaskStatus:
        """Run the prompt until it ends, the deadline passes or the task is cancelled."""

        async def on_event(event: AgentEvent) -> None:
            if event.kind == "text":
                await emitter.delta(EventType.TEXT, event.content or "")
            elif event.kind == "thinking":
                await emitter.delta(EventType.THINKING, event.content or "")
            elif event.kind == "tool_start" and event.tool is not None:
                await emitter.tool(EventType.TOOL_START, event.tool)
            elif event.kind == "tool_end" and event.tool is not None:
                await emitter.tool(EventType.TOOL_END, event.tool)

        run = asyncio.create_task(self._engine.run(request, on_event))
        stopper = asyncio.create_task(cancel.wait())
        try:
            done, _ = await asyncio.wait(
                {run, stopper}, timeout=self._timeout(task), return_when=asyncio.FIRST_COMPLETED
            )
            if run in done:
                progress.outcome = run.result()
                return TaskStatus.COMPLETED
            status = TaskStatus.CANCELLED if cancel.is_set() else TaskStatus.TIMEOUT
            log.info("task %s: %s, aborting the agent", task.task_id, status.value)
            progress.outcome = await self._abort(request, run)
            return status
        finally:
            stopper.cancel()
            if not run.done():
                run.cancel()
                with contextlib.suppress(BaseException):
                    await run

    async def _abort(self, request: PromptRequest, run: asyncio.Task[RunOutcome]) -> RunOutcome:
        grace = self._config.abort_grace
        try:
            await asyncio.wait_for(self._engine.abort(request.directory, request.session_id), grace)
        except Exception as exc:
            log.warning("abort of session %s failed: %s", request.session_id, exc)
        try:
            return await asyncio.wait_for(asyncio.shield(run), grace)
        except Exception:
            return RunOutcome(aborted=True)

    def _timeout(self, task: Task) -> float:
        return task.timeout / 1000 if task.timeout else self._config.default_task_timeout

    def _result(
        self,
        task: Task,
        status: TaskStatus,
        error: str | None,
        error_type: ErrorType | str | None,
        progress: _Progress,
        emitter: EventEmitter,
        started: float,
    ) -> TaskResult:
        outcome, workspace, changes = progress.outcome, progress.workspace, progress.changes
        return TaskResult(
            taskID=task.task_id,
            status=status,
            result=outcome.text or (error or ""),
            session=ResultSession(
                name=task.session.name, opencodeID=progress.session_id or None, messageCount=progress.message_count
            ),
            workspace=ResultWorkspace(
                name=task.workspace.name,
                path=str(workspace.path) if workspace else None,
                git=changes.result_git() if changes else None,
            ),
            metrics=ResultMetrics(
                duration=int((time.monotonic() - started) * 1000),
                promptTokens=outcome.prompt_tokens,
                completionTokens=outcome.completion_tokens,
                toolCalls=max(outcome.tool_calls, emitter.tool_calls),
                streamEvents=emitter.count,
                cost=outcome.cost,
            ),
            error=error,
            errorType=error_type,
            changes=changes.changes if changes else None,
            patch=progress.patch,
        )
