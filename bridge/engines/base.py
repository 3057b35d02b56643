"""The one interface every agent engine implements (OpenCode HTTP, OpenCode CLI, Claude Code).

The task pipeline owns NATS, workspaces, sessions in KV, timeouts and cancellation; an engine only
knows how to open a session in a directory, run one prompt in it while reporting live
:class:`AgentEvent` s, and abort a running prompt. This mirrors httpx's transports: one small
contract, several interchangeable implementations.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ocbridge.client.protocol import ErrorType, ModelRef, OcbridgeError, ToolInfo

AgentEventKind = Literal["text", "thinking", "tool_start", "tool_end"]


@dataclass(slots=True)
class AgentEvent:
    """Something the agent did, as it happened.

    ``text`` and ``thinking`` carry *deltas* (the pipeline coalesces them); ``tool_start`` carries
    the tool with ``args``; ``tool_end`` carries ``output`` and ``duration`` in milliseconds.
    ``started_at``/``ended_at``: when the agent says the tool started and ended (Unix seconds), for
    the tool's trace span; ``None`` when the engine does not tell.
    """

    kind: AgentEventKind
    content: str | None = None
    tool: ToolInfo | None = None
    started_at: float | None = None
    ended_at: float | None = None


EventSink = Callable[[AgentEvent], Awaitable[None]]


@dataclass(slots=True)
class SessionHandle:
    """An engine session: its id and whether :meth:`Engine.open_session` just created it."""

    id: str
    created: bool


@dataclass(frozen=True, slots=True)
class ToolServer:
    """An MCP server (Streamable HTTP) the agent gets for one run: the sidecar's Station tools
    (:mod:`ocbridge.bridge.agent_tools`). ``headers`` carry the run's bearer token, a secret:
    engines pass it to the agent without writing it into the workspace or onto a command line."""

    name: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    #: The tool names it serves (Claude Code must be told to allow them).
    tools: tuple[str, ...] = ()


@dataclass(slots=True)
class PromptRequest:
    directory: Path
    session_id: str
    prompt: str
    model: ModelRef | None = None
    agent: str | None = None
    #: Extra tools for this run (``None``: the agent's own tools only).
    tools: ToolServer | None = None
    #: The task message this run answers, the same for all its redeliveries (``"<taskID> <stream
    #: seq>"``; ``None`` outside JetStream), and which delivery this is. An engine that keeps the
    #: session's history may carry an earlier attempt's interrupted run on instead of starting over.
    delivery: str | None = None
    attempt: int = 1


@dataclass(slots=True)
class RunOutcome:
    """How one prompt ended. ``error`` set means the run failed (provider error, engine failure)."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    tool_calls: int = 0
    message_count: int = 0
    aborted: bool = False
    error: str | None = None
    error_type: ErrorType | str | None = None
    files_edited: list[str] = field(default_factory=list)
    #: The engine's real session id when it only became known during the run (CLI engines create
    #: sessions on first use); ``None`` when it is the one passed in.
    session_id: str | None = None


class EngineError(OcbridgeError):
    """An engine could not do what was asked (server down, bad answer, unknown session...)."""

    default_error_type = ErrorType.ENGINE_ERROR

    def __init__(self, message: str, *, error_type: ErrorType | str | None = None) -> None:
        super().__init__(message, error_type)


class EngineUnavailable(EngineError):
    """The engine cannot serve right now through no fault of the task: its server is down or
    restarting, its event stream is not connected, its store is locked. The task is given back
    and retried after ``retry_after`` seconds (it does not count against the task's attempts)."""

    def __init__(self, message: str, *, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Engine(abc.ABC):
    """An agent engine. Implementations must be safe to use from many concurrent tasks."""

    name: str = "engine"
    #: Whether the engine keeps one tool (MCP) connection per workspace directory for all the
    #: sessions in it (OpenCode serve), rather than one per run: runs in a directory then share
    #: their :class:`ToolServer`.
    shares_tool_connections: bool = False

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start whatever the engine needs (a server process, an HTTP session)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Stop the engine and reap every process it started."""

    @abc.abstractmethod
    async def open_session(self, directory: Path, title: str, existing_id: str | None) -> SessionHandle:
        """Return the existing session when it is still known to the engine, else a new one."""

    @abc.abstractmethod
    async def run(self, request: PromptRequest, on_event: EventSink) -> RunOutcome:
        """Send one prompt and return when the agent is done.

        Calls ``on_event`` for every live event. Returns an outcome with ``aborted=True`` when the
        run was stopped by :meth:`abort`. Raises :class:`EngineError` when the engine itself fails.
        """

    @abc.abstractmethod
    async def abort(self, directory: Path, session_id: str) -> None:
        """Stop the running prompt of a session. Must return within a few seconds."""

    def healthy(self) -> bool:
        """Whether the engine can take a task now. A sidecar whose engine is unhealthy stops
        fetching tasks until it is healthy again, so a broken box never swallows the queue."""
        return True

    async def release(self, directory: Path) -> None:  # noqa: B027 - optional hook
        """Tell the engine a task in ``directory`` is over (it may free per-directory resources)."""

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()
