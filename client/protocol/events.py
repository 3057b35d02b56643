"""Live events on a task's stream subject."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from .base import WireModel

__all__ = ["EventGit", "EventSession", "EventType", "StreamEvent", "ToolInfo"]


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
    """One live event on the task's stream subject. ``seq`` starts at 1 and grows by one.

    A task given back and run again (its sidecar died, or OpenCode was restarting) starts its
    events again at ``seq`` 1 with a higher ``attempt``; a consumer keeps the events of the
    latest attempt (``(attempt, seq)`` is unique).
    """

    task_id: str = Field(alias="taskID")
    seq: int = Field(ge=1)
    #: Addition: the delivery attempt that produced the event (1 for the first run).
    attempt: int | None = Field(default=None, ge=1)
    timestamp: str
    type: str
    content: str | None = None
    tool: ToolInfo | None = None
    git: EventGit | None = None
    session: EventSession | None = None
