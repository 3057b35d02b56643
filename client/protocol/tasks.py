"""A coding task as Station publishes it on the task subject, and the cancel message."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_serializer

from .base import Name, WireModel

__all__ = [
    "CancelRequest",
    "CleanupPolicy",
    "GitSpec",
    "ModelRef",
    "Scope",
    "SessionSpec",
    "Task",
    "TaskCallback",
    "WorkspaceSpec",
]

#: Additions: when the sidecar deletes a workspace, and who owns it.
CleanupPolicy = Literal["on_session_end", "on_success", "manual"]
Scope = Literal["agent", "workflow"]


class SessionSpec(WireModel):
    """Which agent session a task runs in. ``continue`` anything but ``false`` reuses it."""

    name: Name = Field(max_length=200)
    continue_: bool | None = Field(default=None, alias="continue")

    @property
    def reuse(self) -> bool:
        return self.continue_ is not False


class GitSpec(WireModel):
    """A git repository to clone into (or pull in) the workspace before the prompt."""

    url: str = Field(min_length=1)
    branch: Name | None = None
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

    name: Name
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

    provider_id: Name = Field(alias="providerID", max_length=200)
    model_id: Name = Field(alias="modelID", max_length=200)

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
    agent: Name | None = Field(default=None, max_length=200)
    model: ModelRef | None = None
    #: Addition: input files staged in the object store under ``input/<taskID>/<name>``, placed at
    #: ``<workspace>/<name>`` before the prompt.
    files: list[Name] | None = Field(default=None, max_length=1000)


class CancelRequest(WireModel):
    """Published on ``<task subject>.cancel.<taskID>`` to stop a queued or running task."""

    task_id: str = Field(alias="taskID")
    reason: str | None = None
