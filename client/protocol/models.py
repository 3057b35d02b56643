"""The Station ``opencode-nats`` wire protocol: every message that crosses NATS, in one place.

Field names on the wire are Station's exact camelCase names. Python code uses snake_case attributes;
``populate_by_name`` lets both spellings construct a model. Unknown fields are accepted and kept
(``extra="allow"``) so a newer Station can add fields without breaking an older sidecar, and a
re-serialised message still carries them.

Additions beyond Station's protocol stay optional and compatible: statuses ``timeout`` and
``cancelled``, ``metrics.cost``, tool ``duration`` and the cancel message.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
)

from ocbridge.client.kv import kv_key

__all__ = [
    "CancelRequest",
    "EventGit",
    "EventSession",
    "EventType",
    "GitSpec",
    "ModelRef",
    "ResultGit",
    "ResultMetrics",
    "ResultSession",
    "ResultWorkspace",
    "SessionGit",
    "SessionSpec",
    "SessionState",
    "StreamEvent",
    "Task",
    "TaskCallback",
    "TaskRecord",
    "TaskResult",
    "TaskStatus",
    "ToolInfo",
    "ValidationError",
    "WorkspaceSpec",
    "cancel_key",
    "iso_now",
    "record_key",
]


def iso_now() -> str:
    """Current UTC time in Station's format, e.g. ``2026-01-02T10:11:12.345Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class WireModel(BaseModel):
    """Base for protocol messages: camelCase aliases, unknown fields kept, compact JSON output."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")

    def to_wire(self) -> bytes:
        """Serialise as Station does: aliases, no ``null`` for absent optional fields."""
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()

    def to_dict(self) -> dict[str, Any]:
        """The wire form as a ``dict`` (for printing and tests)."""
        return json.loads(self.to_wire())

    @classmethod
    def from_wire(cls, data: bytes | str | dict[str, Any]):
        """Parse a wire message; raises :class:`pydantic.ValidationError` on bad input."""
        if isinstance(data, dict):
            return cls.model_validate(data)
        return cls.model_validate_json(data)


# --------------------------------------------------------------------------------------------- task


class SessionSpec(WireModel):
    """Which agent session a task runs in. ``continue`` anything but ``false`` reuses it."""

    name: str = Field(min_length=1, max_length=200)
    continue_: bool | None = Field(default=None, alias="continue")

    @property
    def reuse(self) -> bool:
        return self.continue_ is not False


class GitSpec(WireModel):
    """A git repository to clone into (or pull in) the workspace before the prompt."""

    url: str = Field(min_length=1)
    branch: str | None = None
    ref: str | None = None
    # The token travels on the wire in clear (Station sends it so); in memory it is a SecretStr so
    # that reprs, logs and tracebacks never show it.
    token: SecretStr | None = None
    token_from_kv: str | None = Field(default=None, alias="tokenFromKV")
    pull: bool | None = None
    shallow: bool | None = None

    @field_serializer("token", when_used="json")
    def _reveal_token(self, token: SecretStr | None) -> str | None:
        return token.get_secret_value() if token is not None else None


class WorkspaceSpec(WireModel):
    """Workspace the task runs in: a bare name or an absolute path, confined under the root."""

    name: str = Field(min_length=1, max_length=4096)
    git: GitSpec | None = None
    # Additions: when the sidecar deletes the workspace, and who owns it.
    cleanup: CleanupPolicy | None = None
    scope: Scope | None = None
    scope_id: str | None = Field(default=None, alias="scopeID")


class TaskCallback(WireModel):
    """Per-task subjects the worker answers on."""

    stream_subject: str = Field(alias="streamSubject", min_length=1)
    result_subject: str = Field(alias="resultSubject", min_length=1)


class ModelRef(WireModel):
    """A model choice as OpenCode names it."""

    provider_id: str = Field(alias="providerID")
    model_id: str = Field(alias="modelID")

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``provider/model``."""
        provider, sep, model = text.partition("/")
        if not sep or not provider or not model:
            raise ValueError(f"model must look like 'provider/model', got {text!r}")
        return cls(providerID=provider, modelID=model)

    def __str__(self) -> str:
        return f"{self.provider_id}/{self.model_id}"


class Task(WireModel):
    """A coding task as Station publishes it on the task subject."""

    task_id: str = Field(alias="taskID", min_length=1, max_length=200)
    session: SessionSpec
    workspace: WorkspaceSpec
    prompt: str = Field(min_length=1)
    timeout: int | None = Field(default=None, ge=1, description="milliseconds")
    callback: TaskCallback
    agent: str | None = None
    model: ModelRef | None = None
    #: Addition: input files staged in the object store under ``input/<taskID>/<name>``, placed at
    #: ``<workspace>/<name>`` before the prompt.
    files: list[str] | None = None


class CancelRequest(WireModel):
    """Published on ``<task subject>.cancel.<taskID>`` to stop a queued or running task."""

    task_id: str = Field(alias="taskID")
    reason: str | None = None


# ------------------------------------------------------------------------------------------- events


class EventType(StrEnum):
    WORKSPACE_CREATED = "workspace_created"
    WORKSPACE_REUSED = "workspace_reused"
    GIT_CLONE = "git_clone"
    GIT_PULL = "git_pull"
    GIT_CHECKOUT = "git_checkout"
    SESSION_CREATED = "session_created"
    SESSION_REUSED = "session_reused"
    PROMPT_SENT = "prompt_sent"
    TEXT = "text"
    THINKING = "thinking"
    TOOL_START = "tool_start"
    TOOL_END = "tool_end"
    ERROR = "error"


class ToolInfo(WireModel):
    name: str
    call_id: str = Field(alias="callID")
    args: dict[str, Any] | None = None
    output: str | None = None
    duration: int | None = Field(default=None, description="milliseconds")
    # Addition: whether the tool failed (only on tool_end).
    error: bool | None = None


class EventGit(WireModel):
    url: str | None = None
    branch: str | None = None
    commit: str | None = None


class EventSession(WireModel):
    name: str
    opencode_id: str | None = Field(default=None, alias="opencodeID")


class StreamEvent(WireModel):
    """One live event on the task's stream subject. ``seq`` starts at 1 and grows by one."""

    task_id: str = Field(alias="taskID")
    seq: int = Field(ge=1)
    timestamp: str
    type: str
    content: str | None = None
    tool: ToolInfo | None = None
    git: EventGit | None = None
    session: EventSession | None = None


# ------------------------------------------------------------------------------------------- result


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
    error_type: str | None = Field(default=None, alias="errorType")
    #: Additions: the files the task changed (from git, or snapshots outside git) and the object
    #: store name of their unified diff (``output/<taskID>/changes.patch``).
    changes: list[FileChange] | None = None
    patch: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == TaskStatus.COMPLETED


# ------------------------------------------------------------------------------------ session state


class SessionGit(WireModel):
    url: str | None = None
    branch: str | None = None
    last_commit: str | None = Field(default=None, alias="lastCommit")


class SessionState(WireModel):
    """Value of the sessions KV bucket, keyed by session name."""

    session_name: str = Field(alias="sessionName")
    opencode_id: str = Field(alias="opencodeID")
    workspace_name: str = Field(alias="workspaceName")
    workspace_path: str = Field(alias="workspacePath")
    created: str
    last_used: str = Field(alias="lastUsed")
    message_count: int = Field(default=0, alias="messageCount")
    git: SessionGit | None = None
    # Additions: which engine owns the session id (opencode, opencode-cli, claudecode), and the
    # title given when it was opened (sessions can be found again by part of it).
    engine: str | None = None
    title: str | None = None
    #: Addition: set by the ``close`` operation. The record stays so that the session can be found
    #: (by name, title or engine id) and continued later; ``open`` clears it.
    closed: bool | None = None


# ------------------------------------------------------------------------------------- task records


class TaskRecord(WireModel):
    """Addition: a task's state in the tasks KV bucket (key ``task.<taskID>``), with its result
    once published, so a watcher that arrives late (or a redelivered attempt) can see it."""

    task_id: str = Field(alias="taskID")
    state: Literal["running", "done", "requeued"]
    sidecar: str | None = None
    attempt: int | None = None
    updated: str = Field(default_factory=iso_now)
    result: TaskResult | None = None


def record_key(task_id: str) -> str:
    """Key of a task's record in the tasks bucket."""
    return "task." + kv_key(task_id)


def cancel_key(task_id: str) -> str:
    """Key a client writes to cancel a task that no sidecar has picked up yet."""
    return "cancel." + kv_key(task_id)


CleanupPolicy = Literal["on_session_end", "on_success", "manual"]
Scope = Literal["agent", "workflow"]

ErrorType = Literal[
    "invalid_task",
    "workspace_error",
    "git_error",
    "engine_error",
    "provider_error",
    "timeout",
    "cancelled",
    "redelivery_exhausted",
    "internal_error",
]


# --- git (issue 3) ---
# Additions for the git layer (bridge/gitops): the files a task changed, and deterministic git
# operations (branch/commit/push/status/diff) on a session's workspace, outside any prompt.


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


GitOpName = Literal["branch", "commit", "push", "status", "diff"]
#: Every operation the sidecar answers on the ops subject: the git ones plus opening and closing a
#: session's workspace (Station's coding_open / coding_close).
OpName = Literal["open", "close", "branch", "commit", "push", "status", "diff"]


class GitOpRequest(WireModel):
    """A git operation on a session's workspace (Station's coding_branch / coding_commit / coding_push)."""

    op: OpName
    #: Session (or workspace name) whose workspace the operation acts on.
    session: str | None = None
    workspace: str | None = None
    #: branch: the branch to create or switch to; push: the branch to push (default: the current one).
    branch: str | None = None
    #: branch: create it when it does not exist (default true).
    create: bool | None = None
    #: commit: the commit message.
    message: str | None = None
    #: commit: stage every change (new, modified, deleted files) first (default true).
    add_all: bool | None = Field(default=None, alias="addAll")
    #: push: remote name (default ``origin``) and whether to set the branch's upstream.
    remote: str | None = None
    set_upstream: bool | None = Field(default=None, alias="setUpstream")
    #: diff: commit or ref to compare the work tree with (default ``HEAD``).
    base: str | None = None
    #: push: a token for this push (else the session's / sidecar's); in memory a SecretStr.
    token: SecretStr | None = None
    token_from_kv: str | None = Field(default=None, alias="tokenFromKV")
    #: open: repository to clone (or pull) into the workspace, session title, lifetime of the workspace.
    git: GitSpec | None = None
    title: str | None = None
    scope: Scope | None = None
    scope_id: str | None = Field(default=None, alias="scopeID")
    cleanup: CleanupPolicy | None = None
    #: close: whether the work succeeded (``on_success`` cleans up only then).
    success: bool | None = None
    #: commit: author and committer (else the sidecar's ``git.user_name`` / ``git.user_email``).
    author_name: str | None = Field(default=None, alias="authorName")
    author_email: str | None = Field(default=None, alias="authorEmail")

    @field_serializer("token", when_used="json")
    def _reveal_token(self, token: SecretStr | None) -> str | None:
        return token.get_secret_value() if token is not None else None


class GitOpResult(WireModel):
    """Outcome of a :class:`GitOpRequest`; every figure comes from git itself."""

    ok: bool
    op: OpName
    #: open: the session name, its engine session id, the workspace and whether a repo was cloned.
    session: str | None = None
    opencode_id: str | None = Field(default=None, alias="opencodeID")
    workspace_path: str | None = Field(default=None, alias="workspacePath")
    repo_cloned: bool | None = Field(default=None, alias="repoCloned")
    managed: bool | None = None
    #: close: whether the workspace was deleted.
    cleaned_up: bool | None = Field(default=None, alias="cleanedUp")
    branch: str | None = None
    previous_branch: str | None = Field(default=None, alias="previousBranch")
    created: bool | None = None
    switched_to: str | None = Field(default=None, alias="switchedTo")
    #: commit: the new commit's id.
    commit_hash: str | None = Field(default=None, alias="commitHash")
    #: HEAD after the operation.
    commit: str | None = None
    files_changed: int | None = Field(default=None, alias="filesChanged")
    insertions: int | None = None
    deletions: int | None = None
    remote: str | None = None
    message: str | None = None
    dirty: bool | None = None
    upstream: str | None = None
    ahead: int | None = None
    behind: int | None = None
    changes: list[FileChange] | None = None
    patch: str | None = None
    patch_truncated: bool | None = Field(default=None, alias="patchTruncated")
    error: str | None = None
    error_type: str | None = Field(default=None, alias="errorType")


__all__ += ["CleanupPolicy", "FileChange", "GitOpName", "GitOpRequest", "GitOpResult", "OpName", "Scope"]


# Models above refer to models defined further down (FileChange, CleanupPolicy).
for _model in (WorkspaceSpec, Task, TaskResult, TaskRecord):
    _model.model_rebuild()
