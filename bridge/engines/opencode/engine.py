"""The OpenCode HTTP engine: drives ``opencode serve`` through its HTTP API and event stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.engines.base import (
    AgentEvent,
    Engine,
    EngineError,
    EventSink,
    PromptRequest,
    RunOutcome,
    SessionHandle,
)

from .api import OpenCodeAPI
from .events import SERVER_LOST, Event, EventHub
from .server import OpenCodeProcess, check_version
from .settings import OpenCodeSettings
from .translate import RunTranslator, describe_error, outcome_from_messages, run_finished

log = logging.getLogger(__name__)

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_last_id_value = 0


def new_message_id() -> str:
    """An OpenCode-style ascending message id (``msg_`` + 12 hex of ms*4096+counter + 14 base62).

    Sending our own id with the prompt tells us which user message is ours without guessing. It
    must sort after every earlier message of the session, as OpenCode's own ids do.
    """
    global _last_id_value
    value = max(int(time.time() * 1000) * 0x1000, _last_id_value + 1)
    _last_id_value = value
    return "msg_" + format(value & 0xFFFFFFFFFFFF, "012x") + "".join(secrets.choice(_BASE62) for _ in range(14))


def _dir_key(directory: Path | str) -> str:
    """The ``?directory=`` string of a directory: absolute, normalised, never resolved through
    symlinks (OpenCode keys instances by the exact string)."""
    return os.path.normpath(os.path.abspath(os.fspath(directory)))


@dataclass
class _DirState:
    holders: int = 0  # open_session() calls not yet release()d
    running: int = 0  # runs in progress
    last_used: float = 0.0
    loaded: bool = False  # whether OpenCode probably holds an instance for it
    lock: asyncio.Lock | None = None

    def __post_init__(self) -> None:
        self.lock = asyncio.Lock()


class OpenCodeEngine(Engine):
    """Runs prompts on OpenCode over HTTP. Safe for many concurrent runs (one per session).

    With ``settings.url`` it connects to an existing server; otherwise it starts and supervises one
    (:class:`OpenCodeProcess`). Directory instances idle for ``idle_dispose_seconds`` are disposed.
    """

    name = "opencode"

    def __init__(self, settings: OpenCodeSettings | None = None) -> None:
        self.settings = settings or OpenCodeSettings()
        self.process: OpenCodeProcess | None = None
        self.api: OpenCodeAPI | None = None
        self.events: EventHub | None = None
        self._dirs: dict[str, _DirState] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.disposed: list[str] = []  # directories disposed by the reaper (for logs and tests)

    @property
    def url(self) -> str | None:
        return self.api.base_url if self.api is not None else None

    # ----------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Launch (or connect to) the server and open the event stream."""
        s = self.settings
        if s.managed:
            self.process = OpenCodeProcess(s)
            url = await self.process.start()
            self.api = OpenCodeAPI(
                url, username=s.username, password=self.process.password, request_timeout=s.request_timeout
            )
            self.process.add_listener(self._on_server)
        else:
            assert s.url is not None
            self.api = OpenCodeAPI(s.url, username=s.username, password=s.password, request_timeout=s.request_timeout)
            try:
                health = await self.api.health()
                check_version(str(health.get("version", "")))
            except BaseException:
                await self.api.aclose()
                raise
        self.events = EventHub(self.api)
        self.events.add_listener(self._on_event)
        try:
            await self.events.start(wait=s.startup_timeout)
        except BaseException:
            await self.aclose()
            raise
        self._reaper = asyncio.create_task(self._reap_loop(), name="opencode-reaper")

    async def aclose(self) -> None:
        """Stop the reaper, the event stream and the managed server."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.events is not None:
            self.events.broadcast(SERVER_LOST)
            await self.events.stop()
            self.events = None
        if self.process is not None:
            await self.process.stop()
            self.process = None
        if self.api is not None:
            await self.api.aclose()
            self.api = None

    def _api(self) -> OpenCodeAPI:
        if self.api is None or self.events is None:
            raise EngineError("OpenCode engine is not started")
        return self.api

    # ----------------------------------------------------------------------------- sessions

    async def open_session(self, directory: Path, title: str, existing_id: str | None) -> SessionHandle:
        """Reuse ``existing_id`` when OpenCode knows it in this directory, else create a session."""
        api, key = self._api(), _dir_key(directory)
        state = await self._hold(key)
        try:
            if existing_id:
                info = await api.get_session(key, existing_id)
                if info is not None and _dir_key(info.get("directory") or key) == key:
                    return SessionHandle(existing_id, created=False)
                if info is not None:
                    log.warning(
                        "OpenCode session %s belongs to %s, not %s: creating a new one",
                        existing_id,
                        info.get("directory"),
                        key,
                    )
            info = await api.create_session(key, title or None)
            return SessionHandle(str(info["id"]), created=True)
        except BaseException:
            state.holders = max(0, state.holders - 1)
            raise

    async def release(self, directory: Path) -> None:
        """The task in ``directory`` is over: its instance may be disposed once idle long enough."""
        state = self._dirs.get(_dir_key(directory))
        if state is not None:
            state.holders = max(0, state.holders - 1)
            state.last_used = time.monotonic()

    async def abort(self, directory: Path, session_id: str) -> None:
        """Ask OpenCode to stop the session's run (the run then ends with ``aborted=True``)."""
        await self._api().abort(_dir_key(directory), session_id, timeout=5.0)

    async def _hold(self, key: str) -> _DirState:
        state = self._dirs.setdefault(key, _DirState())
        assert state.lock is not None
        async with state.lock:  # waits for a dispose in progress
            state.holders += 1
            state.last_used = time.monotonic()
            state.loaded = True
        return state

    # ----------------------------------------------------------------------------- running

    async def run(self, request: PromptRequest, on_event: EventSink) -> RunOutcome:
        """Send the prompt, stream its events to ``on_event``, and return how it ended."""
        api, key, sid = self._api(), _dir_key(request.directory), request.session_id
        assert self.events is not None
        state = self._dirs.setdefault(key, _DirState())
        assert state.lock is not None
        async with state.lock:
            state.running += 1
            state.loaded = True
        message_id = new_message_id()
        translator = RunTranslator(sid, message_id)
        sub = self.events.subscribe(sid, key)  # before the prompt: nothing can be missed
        sent = False
        try:
            model = None
            if request.model is not None:
                model = {"providerID": request.model.provider_id, "modelID": request.model.model_id}
            await api.prompt_async(key, sid, request.prompt, model=model, agent=request.agent, message_id=message_id)
            sent = True
            await self._follow(key, sub, translator, on_event)
            outcome = await self._outcome(key, sid, message_id, translator)
        except asyncio.CancelledError:
            if sent:  # the pipeline gave up on the run: do not let OpenCode go on working
                self._spawn(self._quiet_abort(key, sid))
            raise
        except BaseException:
            if sent and self.events is not None and self.events.connected.is_set():
                self._spawn(self._quiet_abort(key, sid))
            raise
        finally:
            if self.events is not None:
                self.events.unsubscribe(sub)
            state.running -= 1
            state.last_used = time.monotonic()
        return outcome

    async def _follow(self, key: str, sub: Any, tr: RunTranslator, on_event: EventSink) -> None:
        """Feed events to ``on_event`` until the run is over (idle after our prompt was seen)."""
        s = self.settings
        deadline = time.monotonic() + s.max_run_seconds
        next_poll = time.monotonic() + s.status_poll_interval
        poll_failures = idle_polls = 0
        while True:
            now = time.monotonic()
            if now > deadline:
                raise EngineError(f"OpenCode run did not finish within {s.max_run_seconds:.0f}s")
            item = await sub.get(timeout=max(0.05, min(next_poll, deadline) - now))
            if item == SERVER_LOST:
                raise EngineError("OpenCode server was lost during the run (it is being restarted)")
            if isinstance(item, Event):
                for event in tr.feed(item.payload):
                    await on_event(event)
                if item.type in ("session.idle", "session.status") and _is_idle(item) and tr.saw_user_message:
                    return
                if item.type == "session.error" and not tr.saw_user_message:
                    return  # rejected before our message existed (unknown agent): no idle follows
                continue
            # Nothing for a while, or the stream dropped: ask OpenCode directly.
            next_poll = time.monotonic() + s.status_poll_interval
            try:
                status = await self._api().session_status(key, timeout=5.0)
                if tr.session_id in status:
                    idle_polls = 0
                    continue
                messages = await self._api().messages(key, tr.session_id)
                poll_failures = 0
            except EngineError as exc:
                poll_failures += 1
                if poll_failures * s.status_poll_interval >= max(15.0, 3 * s.status_poll_interval):
                    raise EngineError(f"OpenCode stopped answering during the run: {exc}") from exc
                continue
            idle_polls += 1
            if not any((m.get("info") or {}).get("id") == tr.user_message_id for m in messages):
                if idle_polls >= 3:
                    raise EngineError("OpenCode never started the prompt (session idle, prompt not in history)")
            elif run_finished(messages, tr.user_message_id) or idle_polls >= 2:
                # Idle twice in a row: over even without an assistant reply (aborted early).
                return

    async def _outcome(self, key: str, sid: str, message_id: str, tr: RunTranslator) -> RunOutcome:
        api = self._api()
        messages = await api.messages(key, sid)
        # On abort, session.idle precedes the message's final update by a moment: wait for it.
        for _ in range(20):
            if run_finished(messages, message_id) or not tr.saw_assistant:
                break
            await asyncio.sleep(0.05)
            messages = await api.messages(key, sid)
        outcome = outcome_from_messages(messages, message_id, directory=key)
        if not outcome.error and not outcome.aborted and tr.error is not None:
            # An error before any assistant message (unknown model or agent).
            if tr.error.get("name") == "MessageAbortedError":
                outcome.aborted = True
            else:
                outcome.error, outcome.error_type = describe_error(tr.error)
        if not outcome.prompt_tokens and not outcome.completion_tokens:
            outcome.prompt_tokens, outcome.completion_tokens = tr.prompt_tokens, tr.completion_tokens
            outcome.cost = outcome.cost or tr.cost
        outcome.tool_calls = max(outcome.tool_calls, tr.tool_calls)
        for path in tr.files_edited:
            if path not in outcome.files_edited:
                outcome.files_edited.append(path)
        return outcome

    async def _quiet_abort(self, key: str, sid: str) -> None:
        with contextlib.suppress(EngineError):
            await self._api().abort(key, sid, timeout=5.0)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----------------------------------------------------------------------------- events

    async def _on_event(self, event: Event) -> None:
        """Answer permission requests and questions by policy: nobody else will, and an open
        request hangs its session for ever. Replies run in the background so the stream flows."""
        if event.type == "permission.asked" and event.directory:
            request_id = event.properties.get("id")
            permission = str(event.properties.get("permission", ""))
            if isinstance(request_id, str):
                reply = self.settings.permission_reply(permission)
                log.info("OpenCode asks %s permission (%s): replying %s", permission, request_id, reply)
                self._spawn(self._reply(event.directory, request_id, reply))
        elif event.type == "question.asked" and event.directory:
            request_id = event.properties.get("id")
            if isinstance(request_id, str):
                self._spawn(self._reject_question(event.directory, request_id))
        elif event.type == "server.instance.disposed":
            directory = event.properties.get("directory")
            state = self._dirs.get(_dir_key(directory)) if isinstance(directory, str) else None
            if state is not None and not state.running:
                state.loaded = False

    async def _reply(self, directory: str, request_id: str, reply: str) -> None:
        try:
            await self._api().reply_permission(directory, request_id, reply)
        except EngineError as exc:
            log.warning("OpenCode permission reply failed: %s", exc)

    async def _reject_question(self, directory: str, request_id: str) -> None:
        try:
            await self._api().reject_question(directory, request_id)
        except EngineError as exc:
            log.warning("OpenCode question reject failed: %s", exc)

    async def _on_server(self, what: str) -> None:
        """Supervisor news: fail the runs in flight on ``down``; reconnect on ``up``."""
        if self.events is None or self.api is None:
            return
        if what == "down":
            self.events.broadcast(SERVER_LOST)
            return
        assert self.process is not None and self.process.url is not None
        self.api.set_endpoint(self.process.url, self.process.password)
        for state in self._dirs.values():
            state.loaded = False  # a new process holds no instance
        self.events.reconnect()

    # ----------------------------------------------------------------------------- reaper

    async def _reap_loop(self) -> None:
        interval = min(30.0, max(0.05, self.settings.idle_dispose_seconds / 2))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.dispose_idle()
            except Exception:
                log.exception("OpenCode idle reaper failed")

    async def dispose_idle(self) -> list[str]:
        """Dispose every loaded directory instance unused for ``idle_dispose_seconds``."""
        limit = self.settings.idle_dispose_seconds
        done: list[str] = []
        for key, state in list(self._dirs.items()):
            if not _disposable(state, limit):
                continue
            assert state.lock is not None
            async with state.lock:
                if not _disposable(state, limit):  # re-check: a run may have started meanwhile
                    continue
                try:
                    await self._api().dispose_instance(key)
                except EngineError as exc:
                    log.warning("OpenCode dispose of %s failed: %s", key, exc)
                    continue
                state.loaded = False
                if not state.holders and not state.running:
                    self._dirs.pop(key, None)
            log.info("OpenCode instance of %s disposed after %.0fs idle", key, limit)
            self.disposed.append(key)
            done.append(key)
        return done


def _disposable(state: _DirState, limit: float) -> bool:
    return state.loaded and not state.holders and not state.running and (time.monotonic() - state.last_used >= limit)


def _is_idle(event: Event) -> bool:
    if event.type == "session.idle":
        return True
    status = event.properties.get("status")
    return isinstance(status, dict) and status.get("type") == "idle"


__all__ = ["AgentEvent", "OpenCodeEngine", "OpenCodeSettings", "new_message_id"]
