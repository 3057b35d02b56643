"""The single result of a task, on its result subject, and the files it changed."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from .base import WireModel
from .errors import ErrorType

__all__ = [
    "FileChange",
    "ResultGit",
    "ResultMetrics",
    "ResultSession",
    "ResultWorkspace",
    "TaskResult",
    "TaskStatus",
]


class FileChange(WireModel):
    """One file a task changed, as git (or a before/after snapshot for a non-git workspace) reports it."""

    path: str
    status: Literal["added", "modified", "deleted", "renamed"]
    #: Lines added / removed; ``None`` for binary files or content that was not captured.
    insertions: int | None = None
    deletions: int | None = None
    #: The previous path of a renamed file.
    old_path: str | None = Field(default=None, alias="oldPath")
    binary: bool | None = None


class TaskStatus(StrEnum):
    COMPLETED = "completed"
    ERROR = "error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


class ResultSession(WireModel):
    name: str
    opencode_id: str | None = Field(default=None, alias="opencodeID")
    message_count: int | None = Field(default=None, alias="messageCount")


class ResultGit(WireModel):
    branch: str | None = None
    commit: str | None = None
    dirty: bool | None = None


class ResultWorkspace(WireModel):
    name: str
    path: str | None = None
    git: ResultGit | None = None


class ResultMetrics(WireModel):
    duration: int = Field(default=0, description="milliseconds")
    prompt_tokens: int = Field(default=0, alias="promptTokens")
    completion_tokens: int = Field(default=0, alias="completionTokens")
    tool_calls: int = Field(default=0, alias="toolCalls")
    stream_events: int = Field(default=0, alias="streamEvents")
    cost: float | None = None


class TaskResult(WireModel):
    """The single result of a task, on its result subject."""

    task_id: str = Field(alias="taskID")
    status: TaskStatus
    result: str | None = None
    session: ResultSession | None = None
    workspace: ResultWorkspace | None = None
    metrics: ResultMetrics = Field(default_factory=ResultMetrics)
    error: str | None = None
    error_type: ErrorType | str | None = Field(default=None, alias="errorType")
    #: Additions: the files the task changed (from git, or snapshots outside git) and the object
    #: store name of their unified diff (``output/<taskID>/changes.patch``).
    changes: list[FileChange] | None = None
    patch: str | None = None
    #: Addition: fields moved to the object store because the message would exceed the server's
    #: ``max_payload`` (field name -> object name); the client puts them back (:mod:`.spill`).
    spilled: dict[str, str] | None = None

    @property
    def ok(self) -> bool:
        return self.status == TaskStatus.COMPLETED
