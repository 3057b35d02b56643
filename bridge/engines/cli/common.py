"""What the CLI engines share: settings, the run registry, abort, and the JSON-lines run loop.

A CLI engine runs one agent process per prompt (``opencode run``, ``claude -p``), turns its JSON
lines into :class:`AgentEvent` s through an engine-specific :class:`Translator`, and kills the whole
process tree on abort, cancellation or any error.

A failure that is not the task's fault raises :class:`EngineUnavailable` (the task is given back
and tried again later): the binary gone, the CLI killed by a signal the bridge did not send, or a
failure its translator calls transient (OpenCode's database locked). When such a failure happens
before the run did anything, the same command is first tried again here, with backoff.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ocbridge.bridge.engines.base import (
    AgentEvent,
    Engine,
    EngineError,
    EngineUnavailable,
    EventSink,
    PromptRequest,
    RunOutcome,
)
from ocbridge.bridge.processes import INHERITED_ENV, find_binary, inherited_environment

from .process import MAX_LINE, CLIProcess, run_capture

if TYPE_CHECKING:
    from ocbridge.bridge.agent_user import AgentUser

log = logging.getLogger(__name__)

JSON = dict[str, Any]

#: Variables passed through from the bridge's environment (see :data:`ocbridge.bridge.processes.INHERITED_ENV`).
DEFAULT_INHERITED_ENV = INHERITED_ENV


@dataclass(slots=True)
class CLISettings:
    """Settings common to the CLI engines.

    ``state_dir`` holds the private HOME (and XDG dirs) of the agent, hence its sessions: give a
    persistent directory to resume sessions across restarts (a temporary one is used when ``None``).
    """

    binary: str
    state_dir: Path | None = None
    #: Extra environment of the agent (provider URLs, API keys...).
    env: dict[str, str] = field(default_factory=dict)
    #: Directories prepended to the agent's PATH (ripgrep for OpenCode's glob/grep tools).
    extra_path: list[str] = field(default_factory=list)
    #: Extra command-line arguments, added before the prompt options.
    extra_args: list[str] = field(default_factory=list)
    #: The user the CLI runs as (``agent_user``); ``None``: the sidecar's.
    run_as: AgentUser | None = None
    inherit_env: tuple[str, ...] = DEFAULT_INHERITED_ENV
    #: SIGTERM-to-SIGKILL grace when killing a run's process tree.
    kill_grace: float = 2.0
    #: Safety net: a run still going after this long is killed (the pipeline normally times out first).
    max_run_seconds: float = 6 * 3600.0
    #: How long the CLI may take to exit once its output ended.
    exit_timeout: float = 15.0
    #: Timeout of short helper commands (``--version``, session listing).
    command_timeout: float = 30.0
    #: Longest output line kept; a longer one is dropped with a warning.
    max_line_bytes: int = MAX_LINE
    #: A run that fails transiently before doing anything (OpenCode's database locked) is started
    #: again up to this many attempts in all, ``retry_backoff`` seconds apart (doubled each time,
    #: with jitter); after that the task is given back (:class:`EngineUnavailable`).
    retry_attempts: int = 4
    retry_backoff: float = 0.5
    #: Delay before a task given back by this engine is tried again.
    retry_after: float = 2.0


class Translator(abc.ABC):
    """Turns one run's JSON lines into live events and, at the end, an outcome. No I/O."""

    #: The session id seen in the output (``None`` until the CLI reports it).
    session_id: str | None = None
    #: Whether the run did anything yet (printed progress, not just an error). A run that failed
    #: transiently before it started is safe to start again.
    started: bool = False

    @abc.abstractmethod
    def feed(self, event: JSON) -> list[AgentEvent]:
        """Consume one JSON line; return the events it produces."""

    @abc.abstractmethod
    def finish(self, returncode: int, stderr: str, aborted: bool) -> RunOutcome:
        """The outcome once the process exited; raises :class:`EngineError` when it failed
        without saying why in its output, :class:`EngineUnavailable` when the failure is not the
        task's fault."""


@dataclass(eq=False, slots=True)
class _Run:
    directory: str
    requested_id: str
    proc: CLIProcess
    translator: Translator
    aborted: bool = False
    attempts: int = 0

    def matches(self, directory: str, session_id: str) -> bool:
        # "" is the placeholder of a session the CLI has not created yet: it matches such runs.
        ids = {self.requested_id, self.translator.session_id or ""}
        return self.directory == directory and session_id in ids


def real_dir(directory: Path | str) -> str:
    """The canonical form of a directory, used as registry key and as the CLI's cwd."""
    return os.path.realpath(directory)


def plain_text(text: str, limit: int = 200) -> str:
    """Free text (a session title) fit for one argv item: control characters (NUL cannot be in
    argv at all) become spaces, and it is cut at ``limit`` characters."""
    return "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text)[:limit].strip()


def stderr_excerpt(stderr: str, limit: int = 800) -> str:
    """The useful end of a CLI's stderr: ANSI colours stripped, blank lines dropped, last ``limit`` chars."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    joined = " | ".join(lines)
    return joined[-limit:] if joined else "no output on stderr"


class CLIEngine(Engine):
    """Base of the CLI engines: start-up check, run registry, abort and the run loop."""

    settings: CLISettings

    def __init__(self, settings: CLISettings) -> None:
        self.settings = settings
        self.version: str | None = None
        self.binary: str = settings.binary
        self._runs: set[_Run] = set()
        self._state_dir: Path | None = settings.state_dir
        self._temporary_state = False
        #: Runs started again after a transient failure before they did anything (for logs, tests).
        self.retries = 0

    # ---------------------------------------------------------------------------- hooks

    @abc.abstractmethod
    def prepare_state(self, root: Path) -> None:
        """Create whatever the agent needs under its private state directory."""

    @abc.abstractmethod
    def environment(self) -> dict[str, str]:
        """The agent's full environment."""

    def check_version(self, version: str) -> None:
        """Warn about (or refuse) a version this engine was not written for."""

    # ------------------------------------------------------------------------- lifecycle

    @property
    def state_dir(self) -> Path:
        """The private state directory (HOME of the agent); set by :meth:`start`."""
        if self._state_dir is None:
            raise EngineError(f"{self.name} engine is not started")
        return self._state_dir

    async def start(self) -> None:
        """Resolve the binary, prepare the private state directory, log the CLI's version."""
        if self._state_dir is None:
            self._state_dir = Path(tempfile.mkdtemp(prefix=f"ocbridge-{self.name}-"))
            self._temporary_state = True
        self._state_dir.mkdir(parents=True, exist_ok=True)
        self.prepare_state(self._state_dir)
        if self.settings.run_as is not None:
            self.settings.run_as.own_tree(self._state_dir)
        env = self.environment()
        binary = self.settings.binary
        try:
            # Looked up on the agent's PATH, as the agent would.
            self.binary = find_binary(os.path.basename(binary), binary, path=env.get("PATH"))
        except FileNotFoundError as exc:
            raise EngineError(str(exc)) from None
        code, out, err = await run_capture(
            [self.binary, "--version"], cwd=self._state_dir, env=env, timeout=self.settings.command_timeout,
            spawn=self._spawn_options(),
        )
        if code != 0:
            raise EngineError(f"{self.binary} --version failed with code {code}: {stderr_excerpt(err)}")
        self.version = out.strip().splitlines()[0] if out.strip() else "unknown"
        log.info("%s engine: %s version %s", self.name, self.binary, self.version)
        self.check_version(self.version)

    async def aclose(self) -> None:
        """Kill every run still going; remove the state directory if it was a temporary one."""
        runs = list(self._runs)
        for run in runs:
            run.aborted = True
        await asyncio.gather(*(run.proc.kill_tree() for run in runs), return_exceptions=True)
        if self._temporary_state and self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            self._state_dir = None

    def healthy(self) -> bool:
        """Started, and its binary still there and executable (a CLI engine has no server that
        could be down; what each run needs is checked when it starts)."""
        return self._state_dir is not None and os.path.isfile(self.binary) and os.access(self.binary, os.X_OK)

    async def release(self, directory: Path) -> None:
        """Nothing to free: a CLI run holds no resources once its process is gone."""

    async def abort(self, directory: Path, session_id: str) -> None:
        """Kill the process tree of every run of that session (``""`` = runs of a not yet created
        session in that directory); the runs then return an outcome with ``aborted=True``."""
        key = real_dir(directory)
        runs = [run for run in self._runs if run.matches(key, session_id)]
        if not runs:
            log.info("%s: no running prompt for session %r in %s", self.name, session_id, key)
            return
        for run in runs:
            run.aborted = True
        await asyncio.gather(*(run.proc.kill_tree() for run in runs))

    @property
    def running(self) -> int:
        """How many prompts run right now."""
        return len(self._runs)

    # ------------------------------------------------------------------------------ runs

    async def execute(
        self,
        request: PromptRequest,
        argv: list[str],
        translator: Translator,
        on_event: EventSink,
        *,
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
    ) -> RunOutcome:
        """Run one CLI process to completion, relaying its events; the tree is killed on any exit
        path (abort, cancellation, an exception from ``on_event``...). ``env`` adds to (or
        overrides) :meth:`environment` for this run.

        A transient failure before the run started (see :attr:`Translator.started`) starts the
        same command again, up to ``retry_attempts`` in all; :class:`EngineUnavailable` after that.
        """
        s = self.settings
        directory = real_dir(request.directory)
        run = _Run(directory, request.session_id, self._process(argv, directory, stdin, env), translator)
        self._runs.add(run)
        try:
            while True:
                run.attempts += 1
                code, stderr = await self._attempt(run, on_event)
                try:
                    outcome = self._finish(run, code, stderr)
                    break
                except EngineUnavailable as exc:
                    if translator.started or run.aborted or run.attempts >= s.retry_attempts:
                        raise
                    delay = s.retry_backoff * 2 ** (run.attempts - 1) * random.uniform(0.75, 1.25)
                    self.retries += 1
                    log.warning(
                        "%s in %s: %s before the run started; starting it again in %.1fs (attempt %d of %d)",
                        self.name, directory, exc.message, delay, run.attempts + 1, s.retry_attempts,
                    )  # fmt: skip
                    await asyncio.sleep(delay)
                    if run.aborted:  # abort() came while waiting
                        outcome = translator.finish(code, stderr, aborted=True)
                        break
                    run.proc = self._process(argv, directory, stdin, env)
        finally:
            self._runs.discard(run)
        log.info(
            "%s run in %s (session %s) ended: code %s, %s",
            self.name, directory, outcome.session_id, code,
            "aborted" if outcome.aborted else (outcome.error or "ok"),
        )  # fmt: skip
        return outcome

    def _process(self, argv: list[str], directory: str, stdin: bytes | None,
                 env: dict[str, str] | None = None) -> CLIProcess:  # fmt: skip
        s = self.settings
        return CLIProcess(argv, cwd=directory, env={**self.environment(), **(env or {})}, stdin_data=stdin,
                          kill_grace=s.kill_grace, max_line=s.max_line_bytes, spawn=self._spawn_options())  # fmt: skip

    def _spawn_options(self) -> dict[str, Any]:
        run_as = self.settings.run_as
        return run_as.spawn_options() if run_as is not None else {}

    async def _attempt(self, run: _Run, on_event: EventSink) -> tuple[int, str]:
        """Run ``run.proc`` to its end: ``(exit code, stderr tail)``."""
        proc, translator, limit = run.proc, run.translator, self.settings.max_run_seconds
        try:
            async with proc:
                if run.aborted:  # abort() came while the process was starting
                    await proc.kill_tree()
                try:
                    async with asyncio.timeout(limit):
                        async for raw in proc.lines():
                            event = parse_line(raw)
                            if event is not None:
                                for agent_event in translator.feed(event):
                                    await on_event(agent_event)
                except TimeoutError:
                    raise EngineError(f"{self.name} run still going after {limit:.0f}s: killed") from None
                code = await proc.wait(self.settings.exit_timeout)
                stderr = await proc.stderr_done()
        except EngineError as exc:
            if proc.pid is None and not self.healthy():
                # The binary is gone (an upgrade in progress?): not the task's fault.
                raise EngineUnavailable(f"{exc.message} ({self.name} binary missing)",
                                        retry_after=self.settings.retry_after) from exc  # fmt: skip
            raise
        return code, stderr

    def _finish(self, run: _Run, code: int, stderr: str) -> RunOutcome:
        """The translator's outcome; a CLI killed by a signal the bridge did not send (the OOM
        killer, an operator) without telling how the run ended is not the task's fault."""
        try:
            return run.translator.finish(code, stderr, run.aborted)
        except EngineUnavailable:
            raise
        except EngineError as exc:
            if code < 0 and not run.proc.killed and not run.aborted:
                raise EngineUnavailable(f"{exc.message} (killed by signal {-code}, not by the bridge)",
                                        retry_after=self.settings.retry_after) from exc  # fmt: skip
            raise

    def base_environment(self) -> dict[str, str]:
        """Inherited variables (see ``inherit_env``) with ``extra_path`` prepended to PATH."""
        env = inherited_environment(self.settings.inherit_env)
        path = [*self.settings.extra_path, env.get("PATH") or "/usr/local/bin:/usr/bin:/bin"]
        env["PATH"] = os.pathsep.join(p for p in path if p)
        env.setdefault("LANG", "C.UTF-8")
        return env

    async def helper(self, args: list[str], cwd: Path | str) -> tuple[int, str, str]:
        """Run a short helper command of the CLI (same environment as the runs)."""
        try:
            return await run_capture(
                [self.binary, *args], cwd=cwd, env=self.environment(), timeout=self.settings.command_timeout,
                spawn=self._spawn_options(),
            )
        except EngineError as exc:
            if not self.healthy():
                raise EngineUnavailable(f"{exc.message} ({self.name} binary missing)",
                                        retry_after=self.settings.retry_after) from exc  # fmt: skip
            raise


def parse_line(raw: bytes) -> JSON | None:
    """One JSON object line, or ``None`` for blank lines and non-JSON noise."""
    raw = raw.strip()
    if not raw.startswith(b"{"):
        if raw:
            log.debug("ignoring non-JSON output line: %r", raw[:200])
        return None
    try:
        event = json.loads(raw)
    except ValueError:
        log.warning("ignoring malformed JSON line (%d bytes): %r", len(raw), raw[:200])
        return None
    return event if isinstance(event, dict) else None


def as_int(value: Any) -> int:
    """A JSON number as ``int`` (0 for anything else)."""
    return int(value) if isinstance(value, int | float) else 0


def as_float(value: Any) -> float:
    """A JSON number as ``float`` (0.0 for anything else)."""
    return float(value) if isinstance(value, int | float) else 0.0
