"""A managed, supervised ``opencode serve`` process.

The server runs isolated (private HOME and XDG_* directories, the offline switches, HTTP Basic auth
with a random password) and is restarted with backoff when it dies or stops answering health
checks. Listeners hear ``"down"`` as soon as the process is lost (so runs in flight fail fast) and
``"up"`` once a new one answers (so the engine reconnects its event stream).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Literal

from ocbridge.bridge.agent_user import open_agent_file
from ocbridge.bridge.engines.base import EngineError
from ocbridge.bridge.processes import (
    PROVIDER_ENV,
    EnvMarker,
    die_with_parent_hook,
    find_binary,
    inherited_environment,
    kill_group,
    kill_marked,
)

from .api import OpenCodeAPI
from .catalog import catalog_environment
from .settings import OFFLINE_SWITCHES, OpenCodeSettings, opencode_home_env, prepare_opencode_home

log = logging.getLogger(__name__)

_LISTENING = re.compile(r"opencode server listening on (https?://\S+)")
_ERROR_REF = re.compile(r"err_[A-Za-z0-9]+")
_LOGGED_ERROR = re.compile(rb'error="((?:[^"\\]|\\.)*)"')
_LOG_TAIL = 256 * 1024
MARKER_VAR = "OCBRIDGE_OPENCODE_MARKER"
SUPPORTED_MAJOR = 1
TESTED_VERSION = (1, 18)

ServerListener = Callable[[Literal["down", "up"]], Awaitable[None]]


def check_version(version: str) -> None:
    """Refuse a major version other than 1 (the HTTP API moved under ``/api`` in 2.x); warn when
    the version is not the tested 1.18.x."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    if not match:
        raise EngineError(f"OpenCode reported an unparsable version {version!r}")
    major, minor = int(match.group(1)), int(match.group(2))
    if major != SUPPORTED_MAJOR:
        raise EngineError(
            f"OpenCode {version} is not supported: this engine speaks the 1.x HTTP API (tested with 1.18.33)"
        )
    if (major, minor) != TESTED_VERSION:
        log.warning("OpenCode %s has not been tested with this engine (tested: 1.18.33); expect surprises", version)


class OpenCodeProcess:
    """Start, supervise and stop one ``opencode serve``.

    ``url`` and ``password`` describe the live server; the password is random per :meth:`start`
    (unless the settings fix one), kept across supervisor restarts, and never logged.
    """

    def __init__(self, settings: OpenCodeSettings) -> None:
        self.settings = settings
        self.url: str | None = None
        self.version: str | None = None
        self.password: str = ""
        self.restarts = 0
        self.generation = 0  # incremented by every successful launch
        #: Whether the last health check (or the launch) got an answer; cleared when it is lost.
        self.answering = False
        self._marker: EnvMarker | None = None  # new for every launch
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._listeners: list[ServerListener] = []
        self._stopping = False
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.state_dir: Path | None = None
        self.log_path: Path | None = None
        self._log: IO[str] | None = None
        self._catalog_env: dict[str, str] = {}
        self._recent: collections.deque[str] = collections.deque(maxlen=8)  # for error messages
        self._api: OpenCodeAPI | None = None

    @property
    def alive(self) -> bool:
        """Whether the current process is running (``False`` while being restarted)."""
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def add_listener(self, listener: ServerListener) -> None:
        """Call ``listener("down")`` when the server is lost and ``listener("up")`` after a restart."""
        self._listeners.append(listener)

    async def start(self) -> str:
        """Launch the server and return its URL once it answers a health check."""
        s = self.settings
        self._stopping = False
        self.password = s.password or secrets.token_urlsafe(24)
        if s.state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="opencode-state-")
            self.state_dir = Path(self._tmp.name)
        else:
            self.state_dir = Path(s.state_dir)
        self._api = OpenCodeAPI("http://127.0.0.1", username=s.username, password=self.password)
        try:
            self._prepare_state_dir(self.state_dir)
            await self._launch()
        except BaseException:
            await self.stop()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name="opencode-supervisor")
        return self.url  # type: ignore[return-value]

    async def stop(self) -> None:
        """Stop supervising, terminate the process group (SIGTERM, then SIGKILL) and reap it."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._terminate()
        if self._api is not None:
            await self._api.aclose()
            self._api = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ----------------------------------------------------------------------------- launching

    def _prepare_state_dir(self, root: Path) -> None:
        prepare_opencode_home(root)
        self.log_path = root / "opencode-server.log"
        if self.settings.run_as is not None:
            self.settings.run_as.own_tree(root)
            # Out of the agent's folder: it could put a link there for the sidecar to write through.
            self.log_path = root.with_name(f"{root.name}-server.log")
        self._log = open(self.log_path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 - long-lived
        self._catalog_env = catalog_environment(self.settings.models_catalog, self.settings.opencode_config(), root)

    def _environment(self) -> dict[str, str]:
        s, root = self.settings, self.state_dir
        assert root is not None and self._marker is not None
        # Allow-listed only: the server's tools (bash) see this environment, so git tokens, NATS
        # credentials and the bridge's settings stay out. Provider keys pass: OpenCode needs them.
        env = inherited_environment(pattern=PROVIDER_ENV)
        path = [*s.extra_path, env.get("PATH", "/usr/bin:/bin")]
        env.update(opencode_home_env(root))
        env.update(
            PATH=os.pathsep.join(path),
            OPENCODE_CONFIG_CONTENT=json.dumps(s.opencode_config()),
            OPENCODE_SERVER_PASSWORD=self.password,
            OPENCODE_SERVER_USERNAME=s.username,
        )
        # Inherited by every process the server starts, even those in their own session (the bash
        # tool's commands): how _terminate finds them.
        env[MARKER_VAR] = self._marker.value
        env.update(OFFLINE_SWITCHES)
        env.update(self._catalog_env)
        env.update(s.extra_env)
        return env

    async def _launch(self) -> None:
        s = self.settings
        try:
            binary = find_binary("opencode", s.binary)
        except FileNotFoundError as exc:
            raise EngineError(f"OpenCode binary not found or not executable: {exc}") from None
        args = [binary, "serve", "--hostname", s.host, "--port", str(s.port)]
        self._write_log(f"--- starting {' '.join(args)}")
        self._marker = EnvMarker(MARKER_VAR)
        started = time.monotonic()
        self._proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self._environment(),
            cwd=str(self.state_dir),
            start_new_session=True,  # own process group: stop() kills the tools it spawned too
            preexec_fn=die_with_parent_hook(),  # a SIGKILLed sidecar must not leave its server behind
            **(s.run_as.spawn_options() if s.run_as is not None else {}),
        )
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._recent.clear()
        self._pump = asyncio.create_task(self._pump_output(self._proc, ready), name="opencode-output")
        try:
            try:
                url = await asyncio.wait_for(asyncio.shield(ready), s.startup_timeout)
            except TimeoutError as exc:
                raise EngineError(
                    f"OpenCode did not start listening within {s.startup_timeout:.0f}s (log: {self.log_path})"
                ) from exc
            self.url = url
            assert self._api is not None
            self._api.set_endpoint(url, self.password)
            health = await self._api.health(timeout=min(10.0, s.startup_timeout))
            self.version = str(health.get("version", ""))
            check_version(self.version)
        except BaseException:
            ready.cancel()  # nobody waits for it any more (also silences "exception never retrieved")
            await self._terminate()
            raise
        self.generation += 1
        self.answering = True
        log.info(
            "OpenCode %s listening on %s (pid %s, %.1fs)",
            self.version,
            url,
            self._proc.pid,
            time.monotonic() - started,
        )

    async def _pump_output(self, proc: asyncio.subprocess.Process, ready: asyncio.Future[str]) -> None:
        """Copy the server's output to its log file; resolve ``ready`` with the listening URL."""
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line over the stream limit: skip the rest of it
                continue
            if not line:
                break
            text = line.decode("utf-8", errors="replace").rstrip()
            self._write_log(text)
            if text:
                self._recent.append(self._mask(text)[:300])
            match = _LISTENING.search(text)
            if match and not ready.done():
                ready.set_result(match.group(1).rstrip("/"))
        code = await proc.wait()
        if not ready.done():
            tail = " | ".join(self._recent) or "no output"
            ready.set_exception(
                EngineError(f"OpenCode exited with code {code} before listening: {tail} (log: {self.log_path})")
            )

    def explain(self, ref: str) -> str | None:
        """The cause OpenCode logged for the error reference (``err_...``) of a 500 answer, from
        the end of its own log (``$XDG_DATA_HOME/opencode/log``); ``None`` when not found."""
        if self.state_dir is None or not _ERROR_REF.fullmatch(ref):
            return None
        needle = f"ref={ref} ".encode()
        try:
            logs = sorted((self.state_dir / "data" / "opencode" / "log").glob("*.log"),
                          key=lambda p: p.stat().st_mtime, reverse=True)  # fmt: skip
            for path in logs[:2]:
                with open_agent_file(path) as file:
                    file.seek(max(0, path.stat().st_size - _LOG_TAIL))
                    tail = file.read(_LOG_TAIL)
                for line in reversed(tail.splitlines()):
                    if needle in line:
                        match = _LOGGED_ERROR.search(line)
                        text = (match.group(1) if match else line).decode("utf-8", errors="replace")
                        return self._mask(text)[:500]
        except OSError as exc:
            log.debug("OpenCode log unreadable: %s", exc)
        return None

    def _mask(self, text: str) -> str:
        return text.replace(self.password, "***") if self.password else text

    def _write_log(self, text: str) -> None:
        if self._log is not None:
            self._log.write(self._mask(text) + "\n")
            self._log.flush()

    async def _terminate(self) -> None:
        self.answering = False
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            kill_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.settings.stop_timeout)
            except TimeoutError:
                log.warning("OpenCode (pid %s) ignored SIGTERM; killing it", proc.pid)
                kill_group(proc.pid, signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 5.0)
        if proc is not None:
            kill_group(proc.pid, signal.SIGKILL)  # leftovers of the group
            # The bash tool starts commands in their own session (they escape the group) and they
            # outlive a crashed server as orphans: find them by the environment marker (in a thread:
            # it reads every process's environment).
            killed = await asyncio.to_thread(kill_marked, self._marker) if self._marker is not None else 0
            if killed:
                log.info("killed %d leftover process(es) of the OpenCode server", killed)
        if self._pump is not None:
            pump, self._pump = self._pump, None
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(pump, 2.0)
            if not pump.done():
                pump.cancel()

    # ----------------------------------------------------------------------------- supervising

    async def _supervise(self) -> None:
        s = self.settings
        while not self._stopping:
            reason = await self._watch()
            if self._stopping:
                return
            self.answering = False
            log.warning("OpenCode server lost (%s); restarting (log: %s)", reason, self.log_path)
            self._write_log(f"--- server lost: {reason}")
            await self._notify("down")  # first: runs in flight fail now, not after the kill
            await self._terminate()
            delay = s.restart_backoff
            while not self._stopping:
                await asyncio.sleep(delay)
                try:
                    await self._launch()
                except Exception as exc:  # keep supervising whatever happens
                    delay = min(delay * 2, s.restart_backoff_max)
                    log.warning("OpenCode restart failed: %s; retrying in %.1fs", exc, delay)
                    continue
                self.restarts += 1
                await self._notify("up")
                break

    async def _watch(self) -> str:
        """Return why the server is considered lost: exited, or too many failed health checks."""
        s, proc, failures = self.settings, self._proc, 0
        assert proc is not None and self._api is not None
        while True:
            try:
                code = await asyncio.wait_for(asyncio.shield(proc.wait()), s.health_interval)
                return f"exited with code {code}"
            except TimeoutError:
                pass
            try:
                await self._api.health(timeout=max(1.0, min(5.0, s.health_interval)))
                failures, self.answering = 0, True
            except EngineError as exc:
                failures, self.answering = failures + 1, False
                log.warning("OpenCode health check failed (%d/%d): %s", failures, s.health_failures, exc)
                if failures >= s.health_failures:
                    return f"{failures} failed health checks"

    async def _notify(self, what: Literal["down", "up"]) -> None:
        for listener in self._listeners:
            try:
                await listener(what)
            except Exception:
                log.exception("OpenCode server listener failed on %r", what)
