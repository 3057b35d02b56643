"""The OpenCode HTTP engine: drives ``opencode serve`` through its HTTP API and event stream.

This module holds the engine's lifecycle, its sessions and directories, the sending of prompts
(with a retry when the managed server was restarted), the MCP tools registration, the policy
answers to permission requests and the reaper. A run registers for its session's events, then
sends the prompt with ``prompt_async`` (carrying our own message id, so the run knows its user
message); :mod:`.follow` relays its events until it is over and builds its outcome.

Failures that are not the task's fault raise :class:`EngineUnavailable` (the task is given back and
tried again later): the server down or being restarted, the event stream not connected, the
server lost during the run and not back in time, OpenCode's own database locked. The supervised
server restarts itself meanwhile, and :meth:`OpenCodeEngine.healthy` says when it serves again; a
run whose managed server died and came back carries on there (the same user message sent again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from ocbridge.bridge.engines.base import (
    Engine,
    EngineError,
    EngineUnavailable,
    EventSink,
    PromptRequest,
    RunOutcome,
    SessionHandle,
    ToolServer,
)
from ocbridge.bridge.engines.names import check_opencode_session

from .api import RETRY_SERVER, OpenCodeAPI, ServerUnreachable, delivery_part_id, new_message_id, new_part_id
from .directories import DirectoryTracker, dir_key
from .events import SERVER_LOST, Event, EventHub, Subscription
from .follow import RunFollower, ServerLost
from .server import OpenCodeProcess, check_version
from .settings import OpenCodeSettings, mcp_remote_config
from .translate import RunTranslator, earlier_prompt

__all__ = ["OpenCodeEngine"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How often one run carries on after its server was restarted before it is given back.
MAX_RESUMES = 2


class OpenCodeEngine(Engine):
    """Runs prompts on OpenCode over HTTP. Safe for many concurrent runs (one per session).

    With ``settings.url`` it connects to an existing server; otherwise it starts and supervises one
    (:class:`OpenCodeProcess`). Directory instances not in use (between :meth:`open_session` and
    :meth:`release`, or running) for ``idle_dispose_seconds`` are disposed in the background.
    """

    name = "opencode"
    shares_tool_connections = True  # one MCP connection per directory instance

    def __init__(self, settings: OpenCodeSettings | None = None) -> None:
        self.settings = settings or OpenCodeSettings()
        self.process: OpenCodeProcess | None = None
        self.api: OpenCodeAPI | None = None
        self.events: EventHub | None = None
        self.directories = DirectoryTracker(self.settings.idle_dispose_seconds)
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False  # aclose() began: a lost server is not waited for
        self._background: set[asyncio.Task[Any]] = set()
        # Session id -> exchanges (user messages) so far, to report message_count without reading
        # the whole history after every run. Forgotten when its directory is no longer in use (the
        # next run there counts from the history once) and after a failed run.
        self._exchanges: dict[str, int] = {}
        self._dir_sessions: dict[str, set[str]] = {}
        self._follower = RunFollower(self.settings, self._api, self._stream_up, self._exchanges)

    @property
    def url(self) -> str | None:
        return self.api.base_url if self.api is not None else None

    @property
    def disposed(self) -> list[str]:
        """Directories recently disposed by the reaper."""
        return list(self.directories.disposed)

    # ----------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Launch (or connect to) the server and open the event stream."""
        s = self.settings
        self._closing = False
        try:
            if s.managed:
                self.process = OpenCodeProcess(s)
                url = await self.process.start()
                self.api = OpenCodeAPI(
                    url, username=s.username, password=self.process.password, request_timeout=s.request_timeout
                )
                self.api.explain = self.process.explain
                self.process.add_listener(self._on_server)
            else:
                assert s.url is not None
                self.api = OpenCodeAPI(
                    s.url, username=s.username, password=s.password, request_timeout=s.request_timeout
                )
                check_version(str((await self.api.health()).get("version", "")))
            self.events = EventHub(self.api)
            self.events.add_listener(self._on_event)
            await self.events.start(wait=s.startup_timeout)
        except BaseException:
            await self.aclose()
            raise
        self._reaper = asyncio.create_task(self._reap(), name="opencode-reaper")

    async def aclose(self) -> None:
        """Stop the reaper, the event stream and the managed server."""
        self._closing = True
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

    def healthy(self) -> bool:
        """Started, its event stream connected and, for a managed server, the process running and
        answering its health checks. False while the supervisor restarts the server."""
        if self.api is None or self.events is None or not self.events.connected.is_set():
            return False
        process = self.process
        return process is None or (process.alive and process.answering)

    def _stream_up(self) -> bool:
        return self.events is not None and self.events.connected.is_set()

    def _api(self) -> OpenCodeAPI:
        if self.api is None or self.events is None:
            raise EngineError("OpenCode engine is not started")
        return self.api

    async def _ready(self) -> OpenCodeAPI:
        """The API, once the event stream is up (waits while the server is being restarted)."""
        api = self._api()
        assert self.events is not None
        if not self.events.connected.is_set():
            try:
                await asyncio.wait_for(self.events.connected.wait(), self.settings.startup_timeout)
            except TimeoutError:
                raise EngineUnavailable(
                    f"OpenCode is not reachable: its event stream has been down for "
                    f"{self.settings.startup_timeout:.0f}s (server restarting?)",
                    retry_after=RETRY_SERVER,
                ) from None
        return api

    async def _retrying(self, call: Callable[[OpenCodeAPI], Awaitable[T]]) -> T:
        """``call(api)``; when the managed server turns out to be dead (connection refused or
        reset), wait for the supervisor's replacement and call once more."""
        generation, pid = self._server_identity()
        try:
            return await call(await self._ready())
        except ServerUnreachable:
            if not await self._wait_new_server(generation, pid):
                raise
            log.info("OpenCode was restarted; sending the request again")
            return await call(await self._ready())

    def _server_identity(self) -> tuple[int, int | None]:
        """The managed server's generation and pid (what :meth:`_wait_new_server` compares)."""
        return (self.process.generation, self.process.pid) if self.process is not None else (0, None)

    async def _wait_new_server(self, generation: int, pid: int | None) -> bool:
        """Whether the managed server died and a newer one (with its event stream) came up."""
        process, s = self.process, self.settings
        if process is None:
            return False
        # A reset connection to a live server is not ours to fix: give the supervisor 1 s to notice.
        noticed = time.monotonic() + 1.0
        limit = time.monotonic() + s.startup_timeout + 2 * s.restart_backoff
        while time.monotonic() < limit and not self._closing:
            if process.generation > generation and self.events is not None and self.events.connected.is_set():
                return True
            if process.alive and process.pid == pid and time.monotonic() > noticed:
                return False
            await asyncio.sleep(0.05)
        return False

    # ----------------------------------------------------------------------------- sessions

    async def open_session(self, directory: Path, title: str, existing_id: str | None) -> SessionHandle:
        """Reuse ``existing_id`` when OpenCode knows it in this directory, else create a session.
        The directory counts as in use until :meth:`release`."""
        if existing_id:
            check_opencode_session(existing_id)
        key = dir_key(directory)
        await self.directories.hold(key)
        try:
            handle = await self._retrying(lambda api: self._open(api, key, title, existing_id))
        except BaseException:
            self.directories.release(key)
            raise
        self._dir_sessions.setdefault(key, set()).add(handle.id)
        return handle

    async def _open(self, api: OpenCodeAPI, key: str, title: str, existing_id: str | None) -> SessionHandle:
        if existing_id:
            info = await api.get_session(key, existing_id)
            if info is not None and dir_key(info.get("directory") or key) == key:
                return SessionHandle(existing_id, created=False)
            if info is not None:
                log.warning("OpenCode session %s is not in %s: creating a new one", existing_id, key)
        info = await api.create_session(key, title or None)
        self._exchanges[str(info["id"])] = 0
        return SessionHandle(str(info["id"]), created=True)

    async def release(self, directory: Path) -> None:
        """The task in ``directory`` is over: its instance may be disposed once idle long enough,
        and the bookkeeping of its sessions is dropped once no task uses the directory."""
        key = dir_key(directory)
        self.directories.release(key)
        self._forget_unused(key)

    def _forget_unused(self, key: str) -> None:
        """Drop the exchange counts of the sessions of ``key`` once no task uses it."""
        if not self.directories.in_use(key):
            for sid in self._dir_sessions.pop(key, ()):
                self._exchanges.pop(sid, None)

    @property
    def tracked_sessions(self) -> int:
        """Sessions whose exchange count is kept in memory (bounded by the directories in use)."""
        return len(self._exchanges)

    async def abort(self, directory: Path, session_id: str) -> None:
        """Ask OpenCode to stop the session's run (the run then ends with ``aborted=True``)."""
        await self._api().abort(dir_key(directory), check_opencode_session(session_id), timeout=5.0)

    # ----------------------------------------------------------------------------- running

    async def run(self, request: PromptRequest, on_event: EventSink) -> RunOutcome:
        """Send the prompt, stream its events to ``on_event``, and return how it ended."""
        key, sid = dir_key(request.directory), check_opencode_session(request.session_id)
        try:
            async with self.directories.running(key):
                self._dir_sessions.setdefault(key, set()).add(sid)
                return await self._run(request, key, sid, on_event)
        finally:
            self._forget_unused(key)  # a run without open_session()/release()

    async def _run(self, request: PromptRequest, key: str, sid: str, on_event: EventSink) -> RunOutcome:
        # Our own ids: the run knows its user message, and a prompt sent again after a restart
        # updates that message and its text instead of giving the agent the prompt twice.
        message_id, part_id, carried_on = await self._prompt_ids(key, sid, request)
        translator = RunTranslator(sid, message_id)
        if carried_on:
            # An earlier attempt got this prompt into the session and was cut off (its sidecar
            # died); OpenCode kept the history. Sent again, the prompt carries on from there (as
            # after a restart, below): what the agent did then is not done again. The stream sees
            # only the rest: the outcome comes from the history.
            log.info("OpenCode session %s: attempt %d carries on the run an earlier attempt started",
                     sid, request.attempt)
            translator.lossy = True
            self._exchanges.pop(sid, None)
        model = None
        if request.model is not None:
            model = {"providerID": request.model.provider_id, "modelID": request.model.model_id}
        subs: list[Subscription] = []

        async def send(api: OpenCodeAPI) -> None:
            assert self.events is not None
            # Subscribe before the prompt (nothing can be missed); afresh on a retry, so that
            # the old server's "lost" marker does not end the new attempt.
            for old in subs:
                self.events.unsubscribe(old)
            subs[:] = [self.events.subscribe(sid, key)]
            if request.tools is not None:
                await self._ensure_tools(api, key, request.tools)
            await api.prompt_async(key, sid, request.prompt, model=model, agent=request.agent, message_id=message_id,
                                   part_id=part_id)

        sent = False
        try:
            await self._retrying(send)
            sent = True
            for resumes in range(MAX_RESUMES + 1):
                server = self._server_identity()
                try:
                    await self._follower.follow(key, subs[0], translator, on_event)
                    break
                except ServerLost:
                    if resumes == MAX_RESUMES or not await self._wait_new_server(*server):
                        raise
                # OpenCode keeps the session's history in its store: the same user message sent
                # again makes the new server carry on from there (a tool that finished is not run
                # again; a finished exchange is not answered twice) instead of the task running
                # again from the start after a give-back. The stream missed the end of the old
                # server's events: the outcome comes from the history.
                log.info("OpenCode was restarted during the run; resuming session %s from its history", sid)
                translator.lossy = True
                await self._retrying(send)
            return await self._follower.outcome(key, sid, message_id, translator)
        except BaseException:
            # Cancelled (the pipeline gave up), the sink failed, the stream failed...: do not
            # let OpenCode go on working on a run nobody follows any more.
            if sent:
                self._spawn(self._quiet_abort(key, sid))
            self._exchanges.pop(sid, None)  # the history has an unfinished exchange: recount
            raise
        finally:
            for sub in subs:
                if self.events is not None:
                    self.events.unsubscribe(sub)

    async def _prompt_ids(self, key: str, sid: str, request: PromptRequest) -> tuple[str, str, bool]:
        """The ids of the run's user message and text part, and whether they are an earlier
        attempt's (found in the session's history: a later attempt of the same task message)."""
        if request.delivery is None:
            return new_message_id(), new_part_id(), False
        part_id = delivery_part_id(request.delivery, sid)
        if request.attempt > 1:
            earlier = earlier_prompt(await self._retrying(lambda api: api.messages(key, sid)), part_id)
            if earlier is not None:
                message_id, resumable = earlier
                if resumable:
                    return message_id, part_id, True
                # Aborted or failed (a give-back stops the run), or another prompt came after it:
                # prompt afresh, under a new part id (OpenCode keys parts by id).
                return new_message_id(), new_part_id(), False
        return new_message_id(), part_id, False

    async def _ensure_tools(self, api: OpenCodeAPI, key: str, tools: ToolServer) -> None:
        """Register the run's MCP server on the directory's instance (``POST /mcp``), unless the
        same one is registered and connected there already. The registration lives in the
        instance: it is made again after the instance was disposed (by the reaper, or by anyone:
        hence the status check, ~2 ms, rather than trusting the bookkeeping) or the server
        restarted. A failure leaves the run without those tools (logged), never fails it."""
        if self.directories.tools(key) == tools:
            try:
                current = (await api.mcp_status(key)).get(tools.name) or {}
            except EngineUnavailable:
                raise
            except EngineError:
                current = {}
            if current.get("status") == "connected":
                return
        config = mcp_remote_config(tools.url, tools.headers)
        try:
            status = await api.add_mcp(key, tools.name, config)
        except EngineUnavailable:
            raise
        except EngineError as exc:
            log.warning("OpenCode: registering the %s tools in %s failed: %s", tools.name, key, exc)
            return
        state = (status or {}).get(tools.name) or {}
        if state.get("status") != "connected":
            log.warning("OpenCode: the %s tools in %s are %s: %s", tools.name, key, state.get("status"),
                        state.get("error") or "no detail")
            return
        self.directories.set_tools(key, tools)

    async def _quiet_abort(self, key: str, sid: str) -> None:
        try:
            await self._api().abort(key, sid, timeout=5.0)
        except EngineError as exc:  # a lost server stops its runs anyway
            log.debug("OpenCode abort of abandoned run %s failed: %s", sid, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----------------------------------------------------------------------------- events

    async def _on_event(self, event: Event) -> None:
        """Answer permission requests and questions by policy: nobody else will, and an open
        request hangs its session for ever. Replies run in the background so the stream flows."""
        request_id = event.properties.get("id")
        if event.type == "permission.asked" and event.directory and isinstance(request_id, str):
            permission = str(event.properties.get("permission", ""))
            reply = self.settings.permission_reply(permission)
            log.info("OpenCode asks %s permission (%s): replying %s", permission, request_id, reply)
            self._spawn(self._reply(event.directory, request_id, reply))
        elif event.type == "question.asked" and event.directory and isinstance(request_id, str):
            self._spawn(self._reject_question(event.directory, request_id))
        elif event.type == "server.instance.disposed":
            directory = event.properties.get("directory")
            if isinstance(directory, str):
                self.directories.instance_disposed(dir_key(directory))

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
            self.events.reconnect()  # new runs wait for the new server instead of failing
            return
        assert self.process is not None and self.process.url is not None
        self.api.set_endpoint(self.process.url, self.process.password)
        self.directories.forget_instances()
        self.events.reconnect()

    # ----------------------------------------------------------------------------- reaper

    async def dispose_idle(self) -> list[str]:
        """Dispose every directory instance not in use for ``idle_dispose_seconds`` now."""
        return await self.directories.dispose_idle(self._api().dispose_instance)

    async def _reap(self) -> None:
        await self.directories.reap_forever(lambda key: self._api().dispose_instance(key))

