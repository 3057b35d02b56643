"""What is known about a task while it runs, and the result made of it whatever way the task ends."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from ocbridge.bridge.engines.base import RunOutcome
from ocbridge.bridge.workspace.git import ChangeSet, RepoState
from ocbridge.bridge.workspace.paths import Workspace
from ocbridge.client.protocol import (
    ErrorType,
    ResultMetrics,
    ResultSession,
    ResultWorkspace,
    Task,
    TaskResult,
    TaskStatus,
)

from .emitter import EventEmitter

__all__ = ["Phase", "Progress"]

Phase = Literal["lease", "prepare", "prompt", "finish"]


@dataclass
class Progress:
    """What is known about a task so far, for the result whatever way it ends."""

    workspace: Workspace | None = None
    repo: RepoState | None = None
    session_id: str | None = None
    message_count: int | None = None
    #: Which delivery of the task this is, and the task message all its deliveries share (see
    #: :class:`~ocbridge.bridge.engines.base.PromptRequest`).
    attempt: int = 1
    delivery: str | None = None
    outcome: RunOutcome = field(default_factory=RunOutcome)
    changes: ChangeSet | None = None
    patch: str | None = None
    #: Where the task is: a stop during the prompt aborts the agent, in any other phase it
    #: cancels the step.
    phase: Phase = "lease"

    def result(
        self,
        task: Task,
        status: TaskStatus,
        error: str | None,
        error_type: ErrorType | str | None,
        emitter: EventEmitter | None,
        started: float,
    ) -> TaskResult:
        """The task's result as of now (``started``: its ``time.monotonic()`` start)."""
        outcome, workspace, changes = self.outcome, self.workspace, self.changes
        return TaskResult(
            taskID=task.task_id,
            status=status,
            result=outcome.text or (error or ""),
            session=ResultSession(
                name=task.session.name, opencodeID=self.session_id or None, messageCount=self.message_count
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
                toolCalls=max(outcome.tool_calls, emitter.tool_calls if emitter else 0),
                streamEvents=emitter.count if emitter else 0,
                cost=outcome.cost,
            ),
            error=error,
            errorType=error_type,
            changes=changes.changes if changes else None,
            patch=self.patch,
        )
