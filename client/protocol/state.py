"""State kept in KV: a session's record (Station reads it) and a task's record (with its result)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import WireModel, iso_now
from .results import TaskResult

__all__ = ["SessionGit", "SessionState", "TaskRecord"]


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


class TaskRecord(WireModel):
    """Addition: a task's state in the tasks KV bucket (key ``task.<taskID>``), with its result
    once decided, so a watcher that arrives late (or a redelivered attempt) can see it.

    ``publishing``: the result is decided and stored here but maybe not yet published (a
    redelivered copy re-publishes it instead of running again); ``done``: published.
    """

    task_id: str = Field(alias="taskID")
    state: Literal["running", "publishing", "done", "requeued", "retrying"]
    sidecar: str | None = None
    attempt: int | None = None
    #: Attempts that ended without a result through no fault of the task (engine down, KV
    #: unavailable): they do not count against ``max_attempts``.
    retries: int | None = None
    #: Stream sequence of the message being run: a redelivery of that message means its previous
    #: attempt died; another message with the same taskID is a duplicate publish.
    stream_seq: int | None = Field(default=None, alias="streamSeq")
    updated: str = Field(default_factory=iso_now)
    result: TaskResult | None = None
