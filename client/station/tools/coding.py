"""Station's coding tools as plain async Python functions over any :class:`CodingBackend`.

::

    async with CodingTools(backend) as tools:
        s = await tools.coding_open({"repo_url": "https://github.com/org/repo.git", "title": "Add health"})
        await tools.coding_branch({"session_id": s["session_id"], "branch": "feature/health"})
        r = await tools.code({"session_id": s["session_id"], "instruction": "Add a /health endpoint"})
        await tools.coding_commit({"session_id": s["session_id"], "message": "Add /health"})
        await tools.coding_push({"session_id": s["session_id"], "set_upstream": True})
        await tools.coding_close({"session_id": s["session_id"]})

Each tool takes and returns a dict with Station's field names. Work that fails (a task error, a
git error, an unreachable backend) comes back as ``success: false`` with ``error``, as in Station,
so an LLM can read it; ``coding_open`` and ``coding_close`` have no such field in Station and raise
:class:`CodingToolError` instead, as do invalid arguments.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from ocbridge.client.protocol import (
    CleanupPolicy,
    ErrorType,
    GitOpRequest,
    GitOpResult,
    GitSpec,
    ModelRef,
    Naming,
    OcbridgeError,
    SessionSpec,
    Task,
    TaskCallback,
    WorkspaceSpec,
    describe_validation_error,
)

from ..backends.base import CodingBackend
from ..config import relabel_errors
from .models import (
    TOOL_MODELS,
    CodeInput,
    CodeOutput,
    CodingBranchInput,
    CodingBranchOutput,
    CodingCloseInput,
    CodingCloseOutput,
    CodingCommitInput,
    CodingCommitOutput,
    CodingOpenInput,
    CodingOpenOutput,
    CodingPushInput,
    CodingPushOutput,
    FileChanged,
    ToolModel,
)
from .sessions import SessionLookupError, find_session
from .trace import TraceRecorder

_In = TypeVar("_In", bound=ToolModel)

log = logging.getLogger(__name__)


class CodingToolError(OcbridgeError):
    """A tool cannot do what was asked (invalid arguments, no such session, open/close failed)."""

    default_error_type = ErrorType.INVALID_TASK


@dataclass
class ToolDefaults:
    """Settings the tools apply to every call (from Station's ``coding:`` block)."""

    #: Timeout of one ``code`` task, in seconds.
    task_timeout: float = 600.0
    #: Cleanup policy of the workspaces ``coding_open`` creates (``None``: the backend's default).
    cleanup_policy: CleanupPolicy | None = None
    #: Model for ``code`` tasks as ``provider/model`` (``None``: the backend's default).
    model: str | None = None
    #: Token sent with clones and pushes (only for backends that do not hold their own).
    git_token: str | None = None
    #: New session names are ``<prefix>-<8 hex digits>``.
    session_prefix: str = "coding"
    #: Author of ``coding_commit`` commits (``None``: the backend's git identity).
    author_name: str | None = None
    author_email: str | None = None


@dataclass
class _OpenSession:
    workspace: str
    workspace_path: str | None = None


def build_prompt(instruction: str, context: str | None = None, files: list[str] | None = None) -> str:
    """The prompt of a ``code`` call, laid out as Station's backends build it."""
    prompt = f"Context: {context}\n\nTask: {instruction}" if context else instruction
    if files:
        prompt += "\n\nFocus on these files: " + ", ".join(files)
    return prompt


class CodingTools:
    """The six coding tools over one backend. The backend is started on first use."""

    def __init__(self, backend: CodingBackend, *, defaults: ToolDefaults | None = None) -> None:
        self.backend = backend
        self.defaults = defaults or ToolDefaults()
        self._open: dict[str, _OpenSession] = {}
        self._started = False
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        """Start the backend (idempotent; the tools call it themselves)."""
        async with self._start_lock:
            if not self._started:
                await self.backend.start()
                self._started = True

    async def aclose(self) -> None:
        """Stop the backend."""
        if self._started:
            self._started = False
            await self.backend.aclose()

    async def __aenter__(self) -> CodingTools:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def call(self, name: str, arguments: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run the tool called ``name`` (what an LLM tool call or an MCP ``tools/call`` names)."""
        if name not in TOOL_MODELS:
            raise CodingToolError(f"unknown tool {name!r}; the coding tools are {', '.join(TOOL_MODELS)}")
        return await getattr(self, name)(dict(arguments or {}))

    # ------------------------------------------------------------------------------------ tools

    async def coding_open(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Open a session: clone ``repo_url``, use ``workspace_path`` or continue ``existing_session_id``."""
        args = self._parse("coding_open", CodingOpenInput, arguments)
        await self.start()
        if args.existing_session_id:
            try:
                state = find_session(await self.backend.sessions(), args.existing_session_id)
            except SessionLookupError as exc:
                raise CodingToolError(f"coding_open: {exc}") from None
            name, workspace = state.session_name, state.workspace_name
            title = args.title or state.title
        else:
            name = f"{self.defaults.session_prefix}-{uuid.uuid4().hex[:8]}"
            title = args.title
            if args.workspace_path:
                workspace = args.workspace_path
            elif args.scope == "workflow" and args.scope_id:
                # Every step of a workflow finds the same workspace again.
                workspace = f"workflow-{args.scope_id}"
            else:
                workspace = name
        git = None
        if args.repo_url:
            git = GitSpec(url=args.repo_url, branch=args.branch, token=self.defaults.git_token)
        request = GitOpRequest(
            op="open", session=name, workspace=workspace, git=git, title=title, scope=args.scope,
            scopeID=args.scope_id, cleanup=self.defaults.cleanup_policy,
        )
        try:
            reply = await self.backend.op(request)
        except Exception as exc:
            raise CodingToolError(f"coding_open: {exc}") from exc
        if not reply.ok:
            raise CodingToolError(f"coding_open: {reply.error or 'the backend refused to open the session'}")
        self._open[name] = _OpenSession(workspace=workspace, workspace_path=reply.workspace_path)
        return CodingOpenOutput(
            session_id=reply.session or name,
            workspace_path=reply.workspace_path or workspace,
            workspace_id=workspace,
            repo_cloned=reply.repo_cloned if args.repo_url else None,
            managed=bool(reply.managed),
        ).dump()

    async def code(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Run a coding task in the session; the agent's summary, changed files, usage and trace."""
        args = self._parse("code", CodeInput, arguments)
        await self.start()
        try:
            workspace = await self._workspace_of(args.session_id)
        except CodingToolError as exc:
            return CodeOutput(success=False, error=str(exc)).dump()
        task_id = str(uuid.uuid4())
        naming = Naming()  # placeholder subjects: a NATS backend sets its own
        task = Task(
            taskID=task_id,
            session=SessionSpec(name=args.session_id, **{"continue": True}),
            workspace=WorkspaceSpec(name=workspace),
            prompt=build_prompt(args.instruction, args.context, args.files),
            timeout=max(1, int(self.defaults.task_timeout * 1000)),
            callback=TaskCallback(streamSubject=naming.stream_subject(task_id),
                                  resultSubject=naming.result_subject(task_id)),
            model=ModelRef.parse(self.defaults.model) if self.defaults.model else None,
        )
        recorder = TraceRecorder()
        try:
            result = await self.backend.run(task, recorder)
        except Exception as exc:
            return CodeOutput(success=False, error=f"code: {exc}").dump()
        metrics = result.metrics
        ok = result.ok
        return CodeOutput(
            success=ok,
            summary=result.result or "",
            files_changed=[FileChanged.from_change(c) for c in result.changes] if result.changes else None,
            error=None if ok else (result.error or f"task ended with status {result.status.value}"),
            tokens_used=metrics.prompt_tokens + metrics.completion_tokens,
            cost=metrics.cost,
            trace=recorder.trace(result),
        ).dump()

    async def coding_branch(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Create and/or switch to a branch."""
        args = self._parse("coding_branch", CodingBranchInput, arguments)
        reply, error = await self._op(GitOpRequest(op="branch", session=args.session_id, branch=args.branch,
                                                   create=args.create))
        ok = reply is not None and reply.ok
        return CodingBranchOutput(
            success=ok,
            branch=(reply.branch if reply and reply.branch else args.branch),
            created=bool(reply and reply.created),
            switched_to=ok and (reply.switched_to or reply.branch or args.branch) == args.branch,
            previous_branch=reply.previous_branch if reply else None,
            error=error,
        ).dump()

    async def coding_commit(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Commit the workspace's changes; hash and figures come from git."""
        args = self._parse("coding_commit", CodingCommitInput, arguments)
        reply, error = await self._op(GitOpRequest(
            op="commit", session=args.session_id, message=args.message, addAll=args.add_all,
            authorName=self.defaults.author_name, authorEmail=self.defaults.author_email,
        ))
        return CodingCommitOutput(
            success=reply is not None and reply.ok,
            commit_hash=reply.commit_hash if reply else None,
            message=args.message,
            files_changed=reply.files_changed if reply else None,
            insertions=reply.insertions if reply else None,
            deletions=reply.deletions if reply else None,
            error=error,
        ).dump()

    async def coding_push(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Push a branch (the current one by default) to a remote."""
        args = self._parse("coding_push", CodingPushInput, arguments)
        reply, error = await self._op(GitOpRequest(
            op="push", session=args.session_id, remote=args.remote, branch=args.branch,
            setUpstream=args.set_upstream, token=self.defaults.git_token,
        ))
        return CodingPushOutput(
            success=reply is not None and reply.ok,
            remote=(reply.remote if reply and reply.remote else args.remote),
            branch=(reply.branch if reply and reply.branch else args.branch or ""),
            message=reply.message if reply else None,
            error=error,
        ).dump()

    async def coding_close(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Close the session: files changed, and whether the workspace was deleted."""
        args = self._parse("coding_close", CodingCloseInput, arguments)
        await self.start()
        try:
            reply = await self.backend.op(GitOpRequest(op="close", session=args.session_id,
                                                       workspace=args.workspace_id, success=args.success))
        except Exception as exc:
            raise CodingToolError(f"coding_close: {exc}") from exc
        if not reply.ok:
            raise CodingToolError(f"coding_close: {reply.error or 'the backend refused to close the session'}")
        self._open.pop(args.session_id, None)
        return CodingCloseOutput(
            ok=True,
            files_changed=[FileChanged.from_change(c) for c in reply.changes] if reply.changes else None,
            cleaned_up=bool(reply.cleaned_up),
        ).dump()

    # ---------------------------------------------------------------------------------- helpers

    @staticmethod
    def _parse(tool: str, model: type[_In], arguments: Mapping[str, Any]) -> _In:
        try:
            return model.model_validate(dict(arguments))
        except ValidationError as exc:
            problems = describe_validation_error(relabel_errors(exc, unknown="unknown argument"))
            raise CodingToolError(f"{tool}: invalid arguments: {problems}") from None

    async def _op(self, request: GitOpRequest) -> tuple[GitOpResult | None, str | None]:
        """Run a git operation; a failure becomes an error message instead of an exception."""
        await self.start()
        try:
            reply = await self.backend.op(request)
        except Exception as exc:
            return None, f"coding_{request.op}: {exc}"
        return reply, None if reply.ok else (reply.error or f"{request.op} failed")

    async def _workspace_of(self, session_id: str) -> str:
        """The workspace name of an open session (this process's, else the backend's session list)."""
        if session_id in self._open:
            return self._open[session_id].workspace
        try:
            states = await self.backend.sessions()
        except Exception as exc:  # fall back to the session id as the workspace name
            log.warning("listing sessions to find %s's workspace failed: %s", session_id, exc)
            states = []
        for state in states:
            if state.session_name == session_id:
                self._open[session_id] = _OpenSession(state.workspace_name, state.workspace_path)
                return state.workspace_name
        raise CodingToolError(f"unknown session {session_id!r}: open one with coding_open first")
