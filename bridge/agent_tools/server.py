"""The MCP endpoint the agent's tools are served from, inside the sidecar.

One aiohttp listener on loopback, ``POST /mcp`` (MCP's Streamable HTTP transport with plain JSON
answers; ``GET`` and ``DELETE`` are 405, which MCP clients take as "no server-sent stream, no
sessions"). Hand-written on the sidecar's own aiohttp rather than the ``mcp`` package, an optional
extra of the client that the sidecar does not depend on; a tools-only server needs four methods.

Each call must carry ``Authorization: Bearer <token>``, a token :meth:`AgentToolsServer.grant`
issued for a running task (see :mod:`.grants`). Without a live token the answer is 401. The access
log is off: the listener logs nothing about requests but refusals and failures, through the
sidecar's redacting log handlers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from ocbridge.bridge.engines.base import Engine, ToolServer
from ocbridge.bridge.redact import Redactor
from ocbridge.bridge.storage.stores import KeyValueStore
from ocbridge.bridge.workspace.git import GitSettings
from ocbridge.client.protocol import Task

from .grants import Grant, Grants, RunScope
from .policy import KeyPolicy
from .protocol import PROTOCOL_VERSIONS, Dispatcher
from .settings import AgentToolsSettings
from .tools import StationTools

__all__ = ["AgentToolsServer"]

log = logging.getLogger(__name__)

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}

INSTRUCTIONS = (
    "Station's shared state for this coding task. station_kv_get / station_kv_set read and write "
    "key-value state the Station workflow also reads (to pass results and context between steps); "
    "station_session_info describes this coding session (workspace, git branch and commit)."
)


def _version() -> str:
    try:
        return metadata.version("opencode-bridge")
    except metadata.PackageNotFoundError:
        return "0"


class AgentToolsServer:
    """Serves :class:`~.tools.StationTools` over MCP and issues per-task tokens.

    ``async with AgentToolsServer(settings, state=..., sessions=..., ...) as server:`` then, around
    each run of the agent, ``async with server.grant(...) as tools:`` gives the
    :class:`~ocbridge.bridge.engines.base.ToolServer` to hand to the engine.
    """

    def __init__(
        self,
        settings: AgentToolsSettings,
        *,
        state: KeyValueStore,
        sessions: KeyValueStore,
        redactor: Redactor,
        workspace_root: Path,
        git: GitSettings | None = None,
    ) -> None:
        self.settings = settings
        self.redactor = redactor
        self.policy = KeyPolicy(settings, redactor)
        self.grants = Grants(redactor, linger=settings.linger_seconds)
        self.tools = StationTools(
            state=state, sessions=sessions, policy=self.policy, redactor=redactor,
            workspace_root=workspace_root, git=git,
        )
        self.dispatcher: Dispatcher[Grant] = Dispatcher(
            self.tools.specs, self.tools.call, name="ocbridge-station-tools", version=_version(),
            instructions=INSTRUCTIONS,
        )
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        """Listen; returns the endpoint URL (``http://127.0.0.1:<port>/mcp``)."""
        limit = 2 * self.settings.max_value_bytes + 64 * 1024
        app = web.Application(client_max_size=limit)
        app.router.add_route("POST", "/mcp", self._post)
        app.router.add_route("*", "/mcp", self._not_allowed)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port = runner.addresses[0][1]  # the one chosen for port 0
        host = self.settings.host if ":" not in self.settings.host else f"[{self.settings.host}]"
        self.url = f"http://{host}:{port}/mcp"
        log.info("agent tools (MCP) at %s", self.url)
        return self.url

    async def stop(self) -> None:
        self.grants.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> AgentToolsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    # ------------------------------------------------------------------------------ grants

    @contextlib.asynccontextmanager
    async def grant(
        self,
        *,
        task_id: str,
        session: str,
        workspace_name: str,
        workspace_path: Path,
        shared: bool = False,
        token_from_kv: str | None = None,
    ) -> AsyncIterator[ToolServer]:
        """The tool server for one run of the agent, valid until the block ends.

        ``shared``: the engine keeps one tool connection per workspace directory (OpenCode serve),
        so runs in the same directory share a token. ``token_from_kv``: the key the task reads its
        git token from, refused to the tools from now on.
        """
        if self.url is None:
            raise RuntimeError("the agent tools server is not started")
        self.policy.remember_token_key(token_from_kv)
        scope = RunScope(task_id, session, workspace_name, workspace_path)
        grant = self.grants.attach(scope, shared_key=str(workspace_path) if shared else None)
        try:
            yield ToolServer(
                name=self.settings.server_name,
                url=self.url,
                headers={"Authorization": f"Bearer {grant.token}"},
                tools=tuple(spec.name for spec in self.tools.specs),
            )
        finally:
            self.grants.detach(grant, task_id)

    def for_task(self, task: Task, workspace_path: Path, engine: Engine) -> AbstractAsyncContextManager[ToolServer]:
        """:meth:`grant` for a run of ``task`` on ``engine`` in ``workspace_path``."""
        git = task.workspace.git
        return self.grant(
            task_id=task.task_id, session=task.session.name, workspace_name=task.workspace.name,
            workspace_path=workspace_path, shared=engine.shares_tool_connections,
            token_from_kv=git.token_from_kv if git is not None else None,
        )

    # ------------------------------------------------------------------------------ HTTP

    async def _post(self, request: web.Request) -> web.StreamResponse:
        problem = _origin_problem(request)
        if problem is not None:
            log.warning("agent tools: refused a request: %s", problem)
            return web.json_response({"error": problem}, status=403)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        grant = self.grants.lookup(token.strip()) if scheme.lower() == "bearer" else None
        if grant is None:
            # No live task behind it: a run that outlived its task, or a stranger.
            return web.json_response(
                {"error": "no live task for this token"}, status=401,
                headers={"WWW-Authenticate": 'Bearer realm="ocbridge-agent-tools"'},
            )
        version = request.headers.get("MCP-Protocol-Version")
        if version is not None and version not in PROTOCOL_VERSIONS:
            return web.json_response({"error": f"unsupported MCP protocol version {version[:40]!r}"}, status=400)
        body = await request.read()
        answer = await self.dispatcher.answer(body, grant)
        if answer.body is None:
            return web.Response(status=answer.status)
        return web.json_response(answer.body, status=answer.status)

    async def _not_allowed(self, request: web.Request) -> web.StreamResponse:
        # No server-initiated stream (GET) and no sessions to end (DELETE): 405, as MCP specifies.
        return web.Response(status=405, headers={"Allow": "POST"})


def _origin_problem(request: web.Request) -> str | None:
    """MCP servers must refuse foreign ``Origin`` s (DNS rebinding from a browser); agents send none."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return None if origin is None else "Origin null"
    host = urlsplit(origin).hostname or ""
    return None if host in _LOOPBACK else f"Origin {origin[:80]!r} is not a loopback address"
