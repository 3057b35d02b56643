"""The Claude Code engine: one ``claude -p --output-format stream-json`` process per prompt.

Session ids: Claude Code accepts ``--session-id <uuid>`` for a new conversation, so
:meth:`ClaudeCodeEngine.open_session` picks the uuid itself and returns a real id at once; the
first run creates the session under that id (``--session-id``), later runs ``--resume`` it.
Conversations are stored per working directory (``$CLAUDE_CONFIG_DIR/projects/<dir>/<id>.jsonl``):
keep a session in one directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ocbridge.bridge.agent_user import open_agent_file
from ocbridge.bridge.engines.base import (
    AgentEvent,
    EngineError,
    EventSink,
    PromptRequest,
    RunOutcome,
    SessionHandle,
    ToolServer,
)
from ocbridge.bridge.engines.names import check_name, check_uuid
from ocbridge.client.protocol import ToolInfo

from .common import (
    JSON,
    CLIEngine,
    CLISettings,
    Translator,
    as_float,
    as_int,
    plain_text,
    real_dir,
    stderr_excerpt,
)

log = logging.getLogger(__name__)

#: Claude Code tools whose input names the file they change.
EDIT_TOOLS = frozenset({"Write", "Edit", "MultiEdit", "NotebookEdit"})

#: Keep Claude Code quiet and offline except for the model API (the settings' ``env`` may override).
QUIET_ENV: dict[str, str] = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
}


@dataclass(slots=True)
class ClaudeCodeSettings(CLISettings):
    """How to run ``claude -p``.

    ``env`` carries the provider (``ANTHROPIC_BASE_URL``, ``ANTHROPIC_API_KEY``...). Without a
    ``permission_mode`` or ``allowed_tools`` Claude Code refuses every write in ``-p`` mode (the
    run still "succeeds", with ``permission_denials``): the default is ``acceptEdits``.
    """

    binary: str = "claude"
    model: str | None = None
    max_turns: int | None = 100
    allowed_tools: list[str] = field(default_factory=list)
    disallowed_tools: list[str] = field(default_factory=list)
    permission_mode: str | None = "acceptEdits"


class ClaudeTranslator(Translator):
    """stream-json lines -> events and outcome.

    ``assistant`` lines carry one content block each (``text``, ``thinking``, ``tool_use``),
    ``user`` lines the ``tool_result`` s, and the final ``result`` line the answer, usage, cost and
    any error. Tools run by sub-agents (lines with ``parent_tool_use_id``) are reported too, their
    text is not (it is not the answer).
    """

    def __init__(self, directory: str, session_id: str | None = None, *, baseline_cost: float = 0.0) -> None:
        self.directory = directory
        self.session_id = session_id or None
        self.baseline_cost = baseline_cost
        self.outcome = RunOutcome()
        self.result: JSON | None = None
        self.last_texts: list[str] = []
        self.last_message_id: str | None = None
        # Open tool calls: tool_use id -> (name, start time, file it edits).
        #: call id -> (tool name, monotonic and wall-clock start, edited path)
        self.tools: dict[str, tuple[str, float, float, str | None]] = {}

    def feed(self, event: JSON) -> list[AgentEvent]:
        kind = event.get("type")
        self.started = True  # any line: the conversation exists, running it again would repeat it
        if isinstance(event.get("session_id"), str) and event["session_id"]:
            self.session_id = event["session_id"]
        message = event.get("message") if isinstance(event.get("message"), dict) else {}
        content = message.get("content")
        blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
        if kind == "assistant":
            if message.get("model") == "<synthetic>":
                # Claude Code's own message (e.g. "API Error: ..."): the result line reports it.
                return []
            return self._assistant(message, blocks, nested=bool(event.get("parent_tool_use_id")))
        if kind == "user":
            return [e for b in blocks if b.get("type") == "tool_result" for e in self._tool_result(b)]
        if kind == "result":
            self.result = event
        elif kind == "system" and event.get("subtype") == "init":
            log.debug("claude session %s, model %s", event.get("session_id"), event.get("model"))
        return []

    def _assistant(self, message: JSON, blocks: list[JSON], *, nested: bool) -> list[AgentEvent]:
        out: list[AgentEvent] = []
        if not nested and message.get("id") != self.last_message_id:
            # One API message arrives as several lines (one per block); a new id is a new turn.
            self.last_message_id, self.last_texts = message.get("id"), []
        for block in blocks:
            btype = block.get("type")
            if btype == "text" and not nested and isinstance(block.get("text"), str) and block["text"]:
                self.last_texts.append(block["text"])
                out.append(AgentEvent("text", block["text"]))
            elif btype == "thinking" and not nested and isinstance(block.get("thinking"), str) and block["thinking"]:
                out.append(AgentEvent("thinking", block["thinking"]))
            elif btype == "tool_use":
                call_id, name = str(block.get("id") or ""), str(block.get("name") or "tool")
                args = block.get("input") if isinstance(block.get("input"), dict) else None
                path = (args.get("file_path") or args.get("notebook_path")) if name in EDIT_TOOLS and args else None
                now = time.time()
                self.tools[call_id] = (name, time.monotonic(), now, path if isinstance(path, str) else None)
                self.outcome.tool_calls += 1
                tool = ToolInfo(name=name, callID=call_id, args=args)
                out.append(AgentEvent("tool_start", tool=tool, started_at=now))
        return out

    def _tool_result(self, block: JSON) -> list[AgentEvent]:
        call_id = str(block.get("tool_use_id") or "")
        name, started, started_at, path = self.tools.pop(call_id, ("tool", None, None, None))
        duration = int((time.monotonic() - started) * 1000) if started is not None else None
        output = tool_output(block.get("content"))
        failed = bool(block.get("is_error"))
        if path and not failed:
            self._edited(path)
        return [
            AgentEvent(
                "tool_end", tool=ToolInfo(name=name, callID=call_id, output=output, duration=duration, error=failed),
                started_at=started_at, ended_at=time.time(),
            )
        ]

    def _edited(self, path: str) -> None:
        path = str(Path(self.directory, path))  # absolute paths stay as they are
        if path not in self.outcome.files_edited:
            self.outcome.files_edited.append(path)

    def finish(self, returncode: int, stderr: str, aborted: bool) -> RunOutcome:
        outcome, result = self.outcome, self.result
        outcome.session_id = self.session_id
        outcome.text = "".join(self.last_texts).strip()
        if result is None:
            if aborted:
                outcome.aborted = True
                return outcome
            raise EngineError(f"claude exited with code {returncode} without a result: {stderr_excerpt(stderr)}")
        if isinstance(result.get("result"), str):
            outcome.text = result["result"].strip()
        usage = result.get("usage") if isinstance(result.get("usage"), dict) else {}
        outcome.prompt_tokens = sum(
            as_int(usage.get(k)) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        outcome.completion_tokens = as_int(usage.get("output_tokens"))
        outcome.cost = run_cost(result, self.baseline_cost)
        denials = result.get("permission_denials")
        if isinstance(denials, list) and denials:
            names = sorted({str(d.get("tool_name")) for d in denials if isinstance(d, dict)})
            log.warning("claude session %s: permission denied for %s", self.session_id, ", ".join(names))
        outcome.aborted = aborted
        if not aborted and (result.get("is_error") or str(result.get("subtype", "")).startswith("error")):
            outcome.error, outcome.error_type = describe_result_error(result)
        return outcome


def run_cost(result: JSON, baseline: float = 0.0) -> float:
    """Cost of this run.

    ``total_cost_usd`` covers the whole *session* once resumed (Claude Code 2.1.329 restores it
    from the transcript), so prefer the per-run ``model_usage_since_last_result`` (absent from
    error results), else subtract ``baseline``, the session total before the run.
    """
    per_model = result.get("model_usage_since_last_result")
    if isinstance(per_model, dict) and per_model:
        return sum(as_float(m.get("costUSD")) for m in per_model.values() if isinstance(m, dict))
    total = as_float(result.get("total_cost_usd"))
    return total - baseline if total >= baseline else total


def session_cost(transcript: Path) -> float:
    """The session's total cost so far: the last ``cost-state`` entry of its transcript (0 if none)."""
    total = 0.0
    try:
        with open_agent_file(transcript) as lines:
            for line in lines:
                # Cheap prefix test first: transcripts hold megabytes of other entries.
                if b'"cost-state"' in line[:64]:
                    with contextlib.suppress(ValueError):
                        total = as_float(json.loads(line).get("totalCostUSD"))
    except OSError:
        pass
    return total


def describe_result_error(result: JSON) -> tuple[str, str]:
    """``(message, error_type)`` for a failed ``result`` line."""
    subtype = str(result.get("subtype") or "")
    text = result.get("result") if isinstance(result.get("result"), str) else ""
    errors = [str(e) for e in result.get("errors") or [] if e]
    detail = "; ".join(errors)
    status = result.get("api_error_status")
    if subtype == "error_max_turns":
        message = f"Claude Code stopped at the maximum number of turns ({result.get('num_turns')})"
        return (f"{message}: {detail}" if detail else message), "engine_error"
    if status is not None or text.startswith("API Error"):
        return (text or f"API Error: {status}"), "provider_error"
    if subtype == "error_during_execution":
        return f"Claude Code failed during execution: {detail or text or 'no detail'}", "engine_error"
    return (text or detail or f"Claude Code reported an error ({subtype or 'unknown'})"), "engine_error"


def mcp_config(tools: ToolServer) -> tuple[str, dict[str, str]]:
    """``--mcp-config`` JSON for an HTTP MCP server, and the environment it needs.

    Header values (the bearer token) are not put on the command line, which any local user can
    read (``/proc/<pid>/cmdline``), nor in a file: the config names environment variables that
    Claude Code expands (``${VAR}``), and the values travel in the process environment.
    """
    headers, env = {}, {}
    for index, (name, value) in enumerate(tools.headers.items()):
        variable = f"STATION_TOOLS_HEADER_{index}"
        headers[name], env[variable] = "${" + variable + "}", value
    server = {"type": "http", "url": tools.url, "headers": headers}
    return json.dumps({"mcpServers": {tools.name: server}}), env


def tool_output(content: Any) -> str | None:
    """A ``tool_result`` content (a string, or a list of text/image blocks) as text."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict):
                parts.append(block.get("text") if block.get("type") == "text" else f"[{block.get('type')}]")
            elif isinstance(block, str):
                parts.append(block)
        return "\n".join(p for p in parts if isinstance(p, str))
    return str(content)


class ClaudeCodeEngine(CLIEngine):
    """Runs each prompt as ``claude -p`` in the session directory. Safe for concurrent runs."""

    name = "claudecode"
    settings: ClaudeCodeSettings

    def __init__(self, settings: ClaudeCodeSettings | None = None) -> None:
        super().__init__(settings or ClaudeCodeSettings())
        # Titles of sessions opened but not created yet, by id (the first run names the session).
        self._titles: dict[str, str] = {}

    @property
    def config_dir(self) -> Path:
        return self.state_dir / "home" / ".claude"

    def prepare_state(self, root: Path) -> None:
        (root / "home" / ".claude").mkdir(parents=True, exist_ok=True)

    def environment(self) -> dict[str, str]:
        env = self.base_environment()
        env.update(QUIET_ENV)
        env.update(HOME=str(self.state_dir / "home"), CLAUDE_CONFIG_DIR=str(self.config_dir))
        env.update(self.settings.env)
        return env

    def transcript(self, session_id: str) -> Path | None:
        """The stored conversation of a session, if Claude Code has one."""
        try:
            uuid.UUID(session_id)  # also keeps glob characters out of the pattern
        except ValueError:
            return None
        return next((self.config_dir / "projects").glob(f"*/{session_id}.jsonl"), None)

    async def open_session(self, directory: Path, title: str, existing_id: str | None) -> SessionHandle:
        """The existing session if its conversation is stored, else a new uuid (created on first run)."""
        if existing_id:
            check_uuid(existing_id)
        if existing_id and self.transcript(existing_id) is not None:
            return SessionHandle(existing_id, created=False)
        if existing_id in self._titles:  # issued by an earlier open, not run yet: still fresh
            return SessionHandle(existing_id, created=True)
        if existing_id:
            log.info("claude session %s not found: starting a new one", existing_id)
        session_id = str(uuid.uuid4())
        self._titles[session_id] = title
        return SessionHandle(session_id, created=True)

    async def run(self, request: PromptRequest, on_event: EventSink) -> RunOutcome:
        """Run the prompt (passed on stdin) in ``request.session_id`` (``""``: a new session)."""
        s = self.settings
        # Values from the wire are checked first; every value goes as "--option=value": never read
        # as an option, and the variadic options (--allowedTools...) cannot swallow what follows.
        session_id = check_uuid(request.session_id) if request.session_id else ""
        model = request.model.model_id if request.model is not None else s.model
        if model:
            check_name(model, "model")
        if request.agent:
            check_name(request.agent, "agent")
        argv = [self.binary, "-p", "--output-format=stream-json", "--verbose"]
        if s.max_turns:
            argv.append(f"--max-turns={int(s.max_turns)}")
        baseline = 0.0
        if session_id:
            if (transcript := self.transcript(session_id)) is not None:
                argv.append("--resume=" + session_id)
                baseline = await asyncio.to_thread(session_cost, transcript)
            else:
                argv.append("--session-id=" + session_id)
                if title := plain_text(self._titles.pop(session_id, None) or ""):
                    argv.append("--name=" + title)
        if model:
            argv.append("--model=" + model)
        if request.agent:
            argv.append("--agent=" + request.agent)
        allowed, env = list(s.allowed_tools), None
        if request.tools is not None:  # this run's MCP server; -p mode needs its tools allowed
            config, env = mcp_config(request.tools)
            # Claude Code defers MCP tools behind its ToolSearch tool (an extra model turn before
            # the first call); three small tools are cheaper offered at once.
            if "ENABLE_TOOL_SEARCH" not in s.env:
                env["ENABLE_TOOL_SEARCH"] = "false"
            argv += ["--mcp-config=" + config, "--strict-mcp-config"]
            allowed += [f"mcp__{request.tools.name}__{tool}" for tool in request.tools.tools]
        if allowed:
            argv.append("--allowedTools=" + ",".join(allowed))
        if s.disallowed_tools:
            argv.append("--disallowedTools=" + ",".join(s.disallowed_tools))
        if s.permission_mode:
            argv.append("--permission-mode=" + s.permission_mode)
        argv += s.extra_args
        # The prompt goes on stdin: no argv size limit, and a leading "-" is never an option.
        translator = ClaudeTranslator(real_dir(request.directory), request.session_id, baseline_cost=baseline)
        return await self.execute(request, argv, translator, on_event, stdin=request.prompt.encode(), env=env)
