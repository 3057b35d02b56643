"""The OpenCode CLI engine: one ``opencode run --format json`` process per prompt.

No server to supervise: each prompt starts a fresh ``opencode run`` in the session directory (about
2-3 s of start-up on a small machine, versus ~0.1 s per prompt on a warm ``opencode serve``; see the
``opencode`` HTTP engine). ``--attach`` is not used: it truncates the output in 1.18.33.

Sessions are created lazily by ``opencode run`` itself, so :meth:`OpenCodeCLIEngine.open_session`
returns the placeholder id ``""`` for a new session and the run reports the real id in
:attr:`RunOutcome.session_id`.

Concurrent runs share OpenCode's SQLite store (``$XDG_DATA_HOME/opencode/opencode.db``, where the
sessions live, so that any run can continue any session with ``--session``). What OpenCode 1.18.33
does with it, and how this engine copes:

- Every process opens the store with ``PRAGMA journal_mode = WAL`` *before* it sets its
  ``busy_timeout`` (5 s), then applies the schema migrations. On a fresh store, concurrent first
  runs race on both: "database is locked", or a migration's ``CREATE TABLE`` failing. The engine
  therefore creates and migrates the store once, in :meth:`OpenCodeCLIEngine.start`, before any run.
- Every process then upserts its project row; a writer holding the lock longer than the 5 s busy
  timeout (a loaded machine, four runs at once) makes that fail ("Failed query: insert into
  project ..."), and in WAL mode a read-then-write transaction can get ``SQLITE_BUSY`` at once.
  Such a failure before the run printed anything is safe to run again: the engine does, with
  backoff; if it persists, or happens mid-run, the run raises :class:`EngineUnavailable` and the
  task is given back to be tried later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ocbridge.bridge.engines.base import (
    AgentEvent,
    EngineError,
    EngineUnavailable,
    EventSink,
    PromptRequest,
    RunOutcome,
    SessionHandle,
)
from ocbridge.bridge.engines.names import check_name, check_opencode_session
from ocbridge.bridge.engines.opencode.api import RETRY_STORE, STORE_BUSY
from ocbridge.bridge.engines.opencode.catalog import catalog_environment
from ocbridge.bridge.engines.opencode.settings import (
    DEFAULT_PERMISSION,
    OFFLINE_SWITCHES,
    mcp_remote_config,
    opencode_home_env,
    prepare_opencode_home,
)
from ocbridge.bridge.engines.opencode.translate import ABORTED_ERROR, EDIT_TOOLS, describe_error
from ocbridge.client.mappings import deep_merge
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

SUPPORTED_MAJOR = "1."

#: OpenCode's store refusing a query: "database is locked" itself, or (for a statement run with
#: its busy timeout) only "Failed query: <sql>" with the SQLite cause left out.
STORE_FAILURE = re.compile(rf"{STORE_BUSY.pattern}|Failed query:", re.IGNORECASE)


def store_failure(text: str) -> bool:
    """Whether OpenCode's output says its own database refused a query."""
    return bool(STORE_FAILURE.search(text))


@dataclass(slots=True)
class OpenCodeCLISettings(CLISettings):
    """How to run ``opencode run``.

    ``config`` is merged over the headless defaults (no autoupdate, no sharing, the ``permission``
    block below) into ``OPENCODE_CONFIG_CONTENT``; the caller brings ``provider``/``model``.
    ``model`` (``provider/model``) and ``agent`` apply when a request names none.
    """

    binary: str = "opencode"
    config: dict[str, Any] = field(default_factory=dict)
    #: Which models.dev catalog OpenCode reads: "auto", "bundled", "none" or a path (see
    #: ``opencode.catalog``); each run loads it again, so an empty one saves ~2 s of CPU per run.
    models_catalog: str = "auto"
    model: str | None = None
    agent: str | None = None
    #: Print reasoning parts (``--thinking``); without it ``opencode run`` drops them.
    thinking: bool = True

    def opencode_config(self) -> dict[str, Any]:
        """The inline config: headless defaults, then ``config``."""
        # Nobody answers a question here: an "ask" would hang the run, so the permission block
        # allows everything in the directory and denies leaving it, questions and loop detection.
        defaults = {"autoupdate": False, "share": "disabled", "permission": dict(DEFAULT_PERMISSION)}
        return deep_merge(defaults, self.config)


class OpenCodeTranslator(Translator):
    """``opencode run --format json`` lines -> events and outcome.

    Lines: ``step_start``, ``text`` and ``reasoning`` (whole parts, once finished), ``tool_use``
    (once the tool completed or failed), ``step_finish`` (tokens and cost of one model call) and
    ``error``. Final text = text parts of the last step; tokens and cost are summed over all steps.
    """

    def __init__(self, directory: str, session_id: str | None = None) -> None:
        self.directory = directory
        self.session_id = session_id or None
        self.outcome = RunOutcome()
        self.step_texts: list[str] = []
        self.error: JSON | None = None

    def feed(self, event: JSON) -> list[AgentEvent]:
        if isinstance(event.get("sessionID"), str) and event["sessionID"]:
            self.session_id = event["sessionID"]
        kind, part = event.get("type"), event.get("part")
        part = part if isinstance(part, dict) else {}
        if kind != "error":
            self.started = True
        if kind == "step_start":
            self.step_texts = []
        elif kind in ("text", "reasoning"):
            text = part.get("text")
            if isinstance(text, str) and text:
                if kind == "text":
                    self.step_texts.append(text)
                    return [AgentEvent("text", text)]
                return [AgentEvent("thinking", text)]
        elif kind == "tool_use":
            return self._tool(part)
        elif kind == "step_finish":
            tokens = part.get("tokens") if isinstance(part.get("tokens"), dict) else {}
            self.outcome.prompt_tokens += as_int(tokens.get("input"))
            self.outcome.completion_tokens += as_int(tokens.get("output")) + as_int(tokens.get("reasoning"))
            self.outcome.cost += as_float(part.get("cost"))
        elif kind == "error" and isinstance(event.get("error"), dict) and self.error is None:
            self.error = event["error"]
        elif kind not in ("text", "reasoning"):
            log.debug("unknown opencode event type %r", kind)
        return []

    def _tool(self, part: JSON) -> list[AgentEvent]:
        state = part.get("state") if isinstance(part.get("state"), dict) else {}
        name = str(part.get("tool") or "tool")
        call_id = str(part.get("callID") or part.get("id") or "")
        args = state.get("input") if isinstance(state.get("input"), dict) else None
        failed = state.get("status") == "error"
        output = state.get("error") if failed else state.get("output")
        times = state.get("time") if isinstance(state.get("time"), dict) else {}
        start, end = times.get("start"), times.get("end")
        timed = isinstance(start, int | float) and isinstance(end, int | float)
        duration = max(0, int(end - start)) if timed else None
        started_at, ended_at = (start / 1000, end / 1000) if timed else (None, None)  # ms since the epoch
        self.outcome.tool_calls += 1
        if name in EDIT_TOOLS and not failed:
            path = (state.get("metadata") or {}).get("filepath") or (args or {}).get("filePath")
            if isinstance(path, str) and path:
                path = os.path.join(self.directory, path)  # no-op for absolute paths
                if path not in self.outcome.files_edited:
                    self.outcome.files_edited.append(path)
        # The CLI prints a tool only once it is over: start and end are reported together.
        return [
            AgentEvent("tool_start", tool=ToolInfo(name=name, callID=call_id, args=args), started_at=started_at),
            AgentEvent(
                "tool_end",
                tool=ToolInfo(
                    name=name,
                    callID=call_id,
                    output=None if output is None else str(output),
                    duration=duration,
                    error=failed,
                ),
                started_at=started_at,
                ended_at=ended_at,
            ),
        ]

    def finish(self, returncode: int, stderr: str, aborted: bool) -> RunOutcome:
        outcome = self.outcome
        outcome.session_id = self.session_id
        outcome.text = "".join(self.step_texts).strip()
        if aborted or (self.error is not None and self.error.get("name") == ABORTED_ERROR):
            outcome.aborted = True
            return outcome
        if self.error is not None:
            outcome.error, outcome.error_type = describe_error(self.error)
            if store_failure(outcome.error):
                message = f"OpenCode's database refused a query: {outcome.error}"
                raise EngineUnavailable(message, retry_after=RETRY_STORE)
            return outcome
        if returncode != 0:
            message = f"opencode run exited with code {returncode}: {stderr_excerpt(stderr)}"
            if store_failure(stderr):
                raise EngineUnavailable(f"OpenCode's database refused a query: {message}", retry_after=RETRY_STORE)
            raise EngineError(message)
        return outcome


class OpenCodeCLIEngine(CLIEngine):
    """Runs each prompt as ``opencode run --format json`` in the session directory.

    Safe for concurrent runs (one process each). The private state directory holds HOME and the
    XDG directories, hence OpenCode's database of sessions.
    """

    name = "opencode-cli"
    settings: OpenCodeCLISettings

    def __init__(self, settings: OpenCodeCLISettings | None = None) -> None:
        super().__init__(settings or OpenCodeCLISettings())
        # Titles of sessions opened but not created yet, by directory (the run passes --title).
        self._titles: dict[str, str] = {}
        self._catalog_env: dict[str, str] = {}

    def prepare_state(self, root: Path) -> None:
        prepare_opencode_home(root)
        self._catalog_env = catalog_environment(self.settings.models_catalog, self.settings.opencode_config(), root)

    def environment(self) -> dict[str, str]:
        env = self.base_environment()
        env.update(opencode_home_env(self.state_dir))
        env["OPENCODE_CONFIG_CONTENT"] = json.dumps(self.settings.opencode_config())
        env.update(OFFLINE_SWITCHES)
        env.update(self._catalog_env)
        env.update(self.settings.env)
        return env

    def check_version(self, version: str) -> None:
        if not version.startswith(SUPPORTED_MAJOR):
            log.warning("OpenCode %s: the JSON output of `opencode run` was tested with 1.18.33", version)

    async def start(self) -> None:
        """Check the binary, then create and migrate OpenCode's store once (see the module notes):
        concurrent first runs on a fresh store would race on it."""
        await super().start()
        await self.list_sessions(self.state_dir)

    async def list_sessions(self, directory: Path) -> list[JSON]:
        """``opencode session list --format json`` run in ``directory`` (its project's sessions)."""
        s = self.settings
        for attempt in range(1, s.retry_attempts + 1):
            code, out, err = await self.helper(["session", "list", "--format", "json"], cwd=real_dir(directory))
            if code == 0 or not store_failure(err):
                break
            message = f"opencode session list failed with code {code}: {stderr_excerpt(err)}"
            if attempt == s.retry_attempts:
                raise EngineUnavailable(f"OpenCode's database refused a query: {message}", retry_after=RETRY_STORE)
            self.retries += 1
            delay = s.retry_backoff * 2 ** (attempt - 1) * random.uniform(0.75, 1.25)
            log.warning("%s; trying again in %.1fs", message, delay)
            await asyncio.sleep(delay)
        if code != 0:
            raise EngineError(f"opencode session list failed with code {code}: {stderr_excerpt(err)}")
        if not out.strip():
            return []  # no session yet: the command prints nothing
        try:
            sessions = json.loads(out)
        except ValueError as exc:
            raise EngineError(f"opencode session list printed invalid JSON: {out[:200]!r}") from exc
        return [s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else []

    async def open_session(self, directory: Path, title: str, existing_id: str | None) -> SessionHandle:
        """The existing session if OpenCode still knows it (in this directory), else the placeholder
        ``SessionHandle("", created=True)``: the next :meth:`run` creates it with ``title``."""
        key = real_dir(directory)
        if existing_id:
            check_opencode_session(existing_id)
            for session in await self.list_sessions(directory):
                if session.get("id") != existing_id:
                    continue
                where = session.get("directory")
                if isinstance(where, str) and where and real_dir(where) != key:
                    log.info("session %s belongs to %s, not %s: starting a new one", existing_id, where, key)
                    break
                self._titles.pop(key, None)
                return SessionHandle(existing_id, created=False)
            else:
                log.info("opencode session %s not found in %s: starting a new one", existing_id, key)
        self._titles[key] = title
        return SessionHandle("", created=True)

    async def run(self, request: PromptRequest, on_event: EventSink) -> RunOutcome:
        """Run the prompt (passed on stdin); ``session_id`` ``""`` creates a new session."""
        s = self.settings
        directory = real_dir(request.directory)
        # Values from the wire are checked first, then go as "--option=value": never read as options.
        if request.session_id:
            check_opencode_session(request.session_id)
        if request.model is not None:
            check_name(request.model.provider_id, "provider")
            check_name(request.model.model_id, "model")
        model = str(request.model) if request.model is not None else s.model
        agent = request.agent or s.agent
        argv = [self.binary, "run", "--format=json"]
        if s.thinking:
            argv.append("--thinking")
        if request.session_id:
            argv.append("--session=" + request.session_id)
        elif title := plain_text(self._titles.pop(directory, None) or ""):
            argv.append("--title=" + title)  # free text: the "=" form keeps even "-x" a value
        if model:
            argv.append("--model=" + check_name(model, "model"))
        if agent:
            argv.append("--agent=" + check_name(agent, "agent"))
        argv += s.extra_args
        # The prompt goes on stdin, not argv: no size limit (argv strings stop at 128 KiB) and a
        # prompt starting with "-" cannot be taken for an option.
        translator = OpenCodeTranslator(directory, request.session_id)
        env = None
        if request.tools is not None:  # this run's MCP server, in its own inline config
            tools = request.tools
            config = deep_merge(s.opencode_config(), {"mcp": {tools.name: mcp_remote_config(tools.url, tools.headers)}})
            env = {"OPENCODE_CONFIG_CONTENT": json.dumps(config)}
        return await self.execute(request, argv, translator, on_event, stdin=request.prompt.encode(), env=env)
