"""An engine that replays a script of canned agent events: a test double, like httpx's ``MockTransport``.

:class:`ScriptedEngine` runs the whole task pipeline (workspace, session record, live events, timeout,
cancellation, change report, result) in milliseconds, with no OpenCode, no model and no network.
Each prompt replays a *script*: a list of steps, or a callable that picks the steps from the prompt.

Steps: a ``str`` or :class:`Text` (a reply delta), :class:`Thinking`, :class:`Tool` (``tool_start``
then ``tool_end``), :class:`WriteFile` (a real file change under the workspace, so the change report
sees it), :class:`Delay` (so timeouts and cancellation can be tested; an abort cuts it short),
:class:`Usage` (tokens and cost), :class:`Fail` (the run ends with an error outcome) and
:class:`Raise` (the engine itself fails with :class:`EngineError`).

Example::

    from ocbridge.bridge.config import load_config
    from ocbridge.bridge.engines.scripted import ScriptedEngine, Tool, Usage, WriteFile
    from ocbridge.bridge.inprocess.runner import LocalRunner

    engine = ScriptedEngine([
        "Adding a README. ",
        Tool("write", args={"filePath": "README.md"}, output="Wrote file"),
        WriteFile("README.md", "# Demo\\n"),
        "Done.",
        Usage(prompt_tokens=120, completion_tokens=30, cost=0.001),
    ])
    config = load_config(overrides={"workspace_root": "ws", "data_dir": ".ocbridge"})
    async with LocalRunner(config, engine=engine) as runner:
        result = await runner.run(task)          # a ocbridge.client.protocol.Task
    assert result.ok and [c.path for c in result.changes] == ["README.md"]
    assert engine.requests[0].prompt == task.prompt

Replies that depend on the prompt: ``ScriptedEngine(lambda request: [f"echo: {request.prompt}"])``;
the callable may also return one string, be ``async`` or be an async generator of steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from ocbridge.client.protocol import ErrorType, ToolInfo

from .base import AgentEvent, Engine, EngineError, EventSink, PromptRequest, RunOutcome, SessionHandle

__all__ = [
    "Delay", "Fail", "Raise", "Script", "ScriptedEngine", "Step", "Text", "Thinking", "Tool", "Usage", "WriteFile",
]


@dataclass(frozen=True, slots=True)
class Text:
    """A delta of the agent's reply (a plain ``str`` step means the same). The run's ``text`` is all of them."""

    content: str


@dataclass(frozen=True, slots=True)
class Thinking:
    """A delta of the agent's reasoning."""

    content: str


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool call: ``tool_start`` with ``args``, then ``tool_end`` with ``output``, ``duration`` (ms)
    and ``error``. ``call_id`` defaults to ``call_scripted_<n>``."""

    name: str
    args: dict[str, Any] | None = None
    output: str = ""
    duration: int = 0
    error: bool = False
    call_id: str | None = None


@dataclass(frozen=True, slots=True)
class WriteFile:
    """Write ``content`` to ``path`` inside the task's workspace (folders created); ``None`` deletes it.

    Emits no event (add a :class:`Tool` step for that). A path leading out of the workspace makes
    the run fail with :class:`EngineError`.
    """

    path: str
    content: str | bytes | None


@dataclass(frozen=True, slots=True)
class Delay:
    """Pause for ``seconds`` (``None``: until aborted). An abort ends the run with ``aborted=True``."""

    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens and cost of the run (several ``Usage`` steps add up)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0


@dataclass(frozen=True, slots=True)
class Fail:
    """End the run with an error outcome (e.g. the provider refused); later steps are skipped.

    ``error_type`` ``None`` lets the pipeline report ``engine_error``.
    """

    message: str
    error_type: ErrorType | str | None = None


@dataclass(frozen=True, slots=True)
class Raise:
    """Raise :class:`EngineError` from :meth:`ScriptedEngine.run`: the engine itself failed."""

    message: str
    error_type: ErrorType | str | None = None


Step: TypeAlias = str | Text | Thinking | Tool | WriteFile | Delay | Usage | Fail | Raise
Steps: TypeAlias = Iterable[Step] | AsyncIterable[Step] | str
Script: TypeAlias = Iterable[Step] | Callable[[PromptRequest], Steps | Awaitable[Steps]]


@dataclass(eq=False)
class _Run:
    directory: Path
    session_id: str
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


class ScriptedEngine(Engine):
    """An :class:`Engine` that replays ``script`` (steps, or a callable returning them) for every
    prompt. Safe for concurrent tasks.

    Sessions get ids ``ses_scripted_1``, ``ses_scripted_2``...; :meth:`open_session` continues an id
    it opened in the same directory and creates a new one otherwise, and each run reports the
    session's exchange count as ``message_count``. For assertions: :attr:`requests` (every
    :class:`PromptRequest` received), :attr:`aborts` (``(directory, session_id)`` of every abort)
    and :attr:`sessions` (session id -> directory).
    """

    name = "scripted"

    def __init__(self, script: Script = ()) -> None:
        self.script: Script = script if callable(script) else [script] if isinstance(script, str) else list(script)
        self.requests: list[PromptRequest] = []
        self.aborts: list[tuple[Path, str]] = []
        self.sessions: dict[str, Path] = {}
        self._exchanges: dict[str, int] = {}
        self._running: list[_Run] = []
        self._ids = 0
        self._calls = 0

    async def open_session(self, directory: Path, title: str, existing_id: str | None) -> SessionHandle:
        if existing_id and self.sessions.get(existing_id) == directory:
            return SessionHandle(existing_id, created=False)
        self._ids += 1
        session_id = f"ses_scripted_{self._ids}"
        self.sessions[session_id] = directory
        self._exchanges[session_id] = 0
        return SessionHandle(session_id, created=True)

    async def run(self, request: PromptRequest, on_event: EventSink) -> RunOutcome:
        self.requests.append(request)
        if request.session_id not in self.sessions:
            raise EngineError(f"unknown session {request.session_id!r}")
        run = _Run(request.directory, request.session_id)
        self._running.append(run)
        outcome, texts = RunOutcome(), []
        try:
            async for step in self._steps(request):
                if isinstance(step, str | Text):
                    text = step if isinstance(step, str) else step.content
                    texts.append(text)
                    await on_event(AgentEvent("text", content=text))
                elif isinstance(step, Thinking):
                    await on_event(AgentEvent("thinking", content=step.content))
                elif isinstance(step, Tool):
                    await self._tool(step, outcome, on_event)
                elif isinstance(step, WriteFile):
                    _write(request.directory, step.path, step.content)
                    if step.content is not None and step.path not in outcome.files_edited:
                        outcome.files_edited.append(step.path)
                elif isinstance(step, Delay):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(run.aborted.wait(), step.seconds)
                elif isinstance(step, Usage):
                    outcome.prompt_tokens += step.prompt_tokens
                    outcome.completion_tokens += step.completion_tokens
                    outcome.cost += step.cost
                elif isinstance(step, Fail):
                    outcome.error, outcome.error_type = step.message, step.error_type
                    break
                elif isinstance(step, Raise):
                    raise EngineError(step.message, error_type=step.error_type)
                else:
                    raise TypeError(f"not a ScriptedEngine step: {step!r}")
                if run.aborted.is_set():
                    break
        finally:
            self._running.remove(run)
        outcome.aborted = run.aborted.is_set()
        outcome.text = "".join(texts)
        self._exchanges[request.session_id] += 1
        outcome.message_count = self._exchanges[request.session_id]
        return outcome

    async def abort(self, directory: Path, session_id: str) -> None:
        """Stop the session's running prompts: they return ``RunOutcome(aborted=True)`` at once."""
        self.aborts.append((directory, session_id))
        for run in self._running:
            if run.directory == directory and run.session_id == session_id:
                run.aborted.set()

    async def aclose(self) -> None:
        for run in self._running:
            run.aborted.set()

    async def _steps(self, request: PromptRequest) -> AsyncIterator[Step]:
        steps = self.script(request) if callable(self.script) else self.script
        if inspect.isawaitable(steps):
            steps = await steps
        if isinstance(steps, str):
            yield steps
        elif isinstance(steps, AsyncIterable):
            async for step in steps:
                yield step
        else:
            for step in steps:
                yield step

    async def _tool(self, step: Tool, outcome: RunOutcome, on_event: EventSink) -> None:
        self._calls += 1
        info = {"name": step.name, "callID": step.call_id or f"call_scripted_{self._calls}"}
        outcome.tool_calls += 1
        await on_event(AgentEvent("tool_start", tool=ToolInfo(**info, args=step.args)))
        await on_event(AgentEvent("tool_end", tool=ToolInfo(
            **info, output=step.output, duration=step.duration, error=step.error,
        )))


def _write(directory: Path, name: str, content: str | bytes | None) -> None:
    root = directory.resolve()
    target = (root / name).resolve()
    if target == root or not target.is_relative_to(root):
        raise EngineError(f"scripted write outside the workspace: {name!r}")
    if content is None:
        target.unlink(missing_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        target.write_text(content)
    else:
        target.write_bytes(content)
