"""Workspace operations outside any prompt: open and close a session's workspace, and git
branch / commit / push / status / diff. Station's coding_* tools call these so that git work is
deterministic (results from git itself), never an LLM prompt.

The same :class:`OpsHandler` answers NATS requests in the sidecar and direct calls in-process.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from ocbridge.bridge.engines.base import Engine
from ocbridge.bridge.observability import tracing
from ocbridge.bridge.redact import Redactor
from ocbridge.bridge.storage.sessions import SessionStore
from ocbridge.bridge.workspace.git import run_op, status
from ocbridge.bridge.workspace.git.repo import remote_url
from ocbridge.bridge.workspace.janitor import WorkspaceJanitor
from ocbridge.bridge.workspace.prepare import WorkspaceFailure, WorkspaceFlow
from ocbridge.client.protocol import (
    ErrorType,
    GitOpRequest,
    GitOpResult,
    OcbridgeError,
    SessionGit,
    SessionState,
    error_type_of,
    iso_now,
)

log = logging.getLogger(__name__)


class OpsHandler:
    """Runs :class:`GitOpRequest` s; every failure becomes an ``ok: false`` result, never a raise."""

    def __init__(
        self,
        *,
        engine: Engine,
        sessions: SessionStore,
        flow: WorkspaceFlow,
        janitor: WorkspaceJanitor,
        redactor: Redactor,
    ) -> None:
        self._engine = engine
        self._sessions = sessions
        self._flow = flow
        self._janitor = janitor
        self._redactor = redactor

    async def handle(self, request: GitOpRequest) -> GitOpResult:
        """Run one operation, in a ``workspace.<op>`` trace span (git steps are its children)."""
        with tracing.span(f"workspace.{request.op}") as span:
            result = await self._handle(request)
            if span.is_recording():
                span.set_attributes({"workspace.op": request.op, "workspace.ok": result.ok,
                                     "workspace.session": request.session or "",
                                     "workspace.name": request.workspace or ""})
                if not result.ok:
                    tracing.mark_failed(span, str(result.error_type or "failed"))
            return result

    async def _handle(self, request: GitOpRequest) -> GitOpResult:
        try:
            if request.op == "open":
                return await self._open(request)
            path, state = await self._locate(request)
            lease_key = state.session_name if state else f"workspace:{path}"
            # Owners are unique per request: a lease is only ever taken back from the same owner.
            async with self._sessions.lease(lease_key, owner=f"op {request.op} {uuid.uuid4().hex[:8]}"):
                if request.op == "close":
                    return await self._close(request, path, state)
                return await self._git(request, path, state)
        except OcbridgeError as exc:
            return self._failed(request, exc.message, exc.error_type)
        except Exception as exc:
            log.exception("operation %s failed", request.op)
            return self._failed(request, f"internal error: {exc}", error_type_of(exc))

    def _failed(self, request: GitOpRequest, message: str, error_type: ErrorType | str) -> GitOpResult:
        return GitOpResult(
            ok=False, op=request.op, session=request.session, branch=request.branch, remote=request.remote,
            error=self._redactor.text(message), errorType=error_type,
        )

    async def _locate(self, request: GitOpRequest) -> tuple[Path, SessionState | None]:
        """The workspace an operation acts on: its session's, or a named workspace. Either way the
        real path, confined under the workspace root: the ``workspacePath`` of a session record is
        read back from KV, so a foreign or corrupt record is refused, never acted on."""
        if request.session:
            state = await self._sessions.get(request.session)
            if state is None:
                raise WorkspaceFailure(f"no session named {request.session!r}", ErrorType.INVALID_TASK)
            if state.closed:
                raise WorkspaceFailure(f"session {request.session!r} is closed: open it again to continue",
                                       ErrorType.INVALID_TASK)
            return self._flow.confined(state.workspace_path, f"session {request.session!r}"), state
        if request.workspace:
            path = self._flow.path_of(request.workspace)
            if not path.is_dir():
                raise WorkspaceFailure(f"no workspace named {request.workspace!r}", ErrorType.INVALID_TASK)
            return path, None
        raise WorkspaceFailure(f"{request.op}: 'session' or 'workspace' is required", ErrorType.INVALID_TASK)

    async def _open(self, request: GitOpRequest) -> GitOpResult:
        name = request.session
        if not name:
            raise WorkspaceFailure("open: 'session' is required", ErrorType.INVALID_TASK)
        async with self._sessions.lease(name, owner=f"op open {uuid.uuid4().hex[:8]}"):
            workspace = self._flow.open(request.workspace or name)
            await self._janitor.touch(
                workspace.path, policy=request.cleanup, scope=request.scope, scope_id=request.scope_id
            )
            repo = None
            if request.git is not None:
                with self._janitor.using(workspace.path):
                    repo = await self._flow.clone_or_pull(workspace, request.git, None)
            try:
                state, _ = await self._sessions.open_or_continue(
                    self._engine, name=name, workspace_name=request.workspace or name, path=workspace.path,
                    title=request.title,
                    git=SessionGit(url=repo.url, branch=repo.branch, lastCommit=repo.commit) if repo else None,
                )
            finally:
                await self._engine.release(workspace.path)
            return GitOpResult(
                ok=True,
                op="open",
                session=name,
                opencodeID=state.opencode_id or None,
                workspacePath=str(workspace.path),
                repoCloned=repo is not None and repo.action == "cloned",
                managed=True,
                branch=repo.branch if repo else None,
                commit=repo.commit if repo else None,
            )

    async def _close(self, request: GitOpRequest, path: Path, state: SessionState | None) -> GitOpResult:
        changes = None
        if (path / ".git").exists():
            report = await status(path, settings=self._flow.git, redactor=self._redactor)
            changes = report.changes
        record = await self._janitor.record(path)
        closes_workflow = request.scope == "workflow"
        cleaned = False
        if record is None or record.scope != "workflow" or closes_workflow:
            cleaned = await self._janitor.on_close(path, success=request.success is not False)
        if state is not None:
            # Kept (marked closed) rather than deleted: a later open continues the conversation.
            state.closed = True
            state.last_used = iso_now()
            await self._sessions.put(state)
        return GitOpResult(ok=True, op="close", session=request.session, changes=changes, cleanedUp=cleaned,
                           workspacePath=str(path))

    async def _git(self, request: GitOpRequest, path: Path, state: SessionState | None) -> GitOpResult:
        token = None
        if request.op == "push":
            url = await remote_url(path, request.remote or "origin", push=True, settings=self._flow.git)
            secret = request.token.get_secret_value() if request.token else None
            async with self._flow.token(url or "", secret, request.token_from_kv) as token:
                result = await run_op(path, request, settings=self._flow.git, token=token,
                                      author=self._author(request), redactor=self._redactor)
        else:
            result = await run_op(path, request, settings=self._flow.git, author=self._author(request),
                                  redactor=self._redactor)
        result.session = request.session
        if state is not None and result.ok and request.op in ("branch", "commit"):
            state.last_used = iso_now()
            state.git = SessionGit(
                url=state.git.url if state.git else None,
                branch=result.branch or (state.git.branch if state.git else None),
                lastCommit=result.commit_hash or result.commit or (state.git.last_commit if state.git else None),
            )
            await self._sessions.put(state)
        return result

    def _author(self, request: GitOpRequest) -> tuple[str, str]:
        return (request.author_name or self._flow.git.user_name, request.author_email or self._flow.git.user_email)
