"""Getting a workspace ready for work and reporting what the work changed.

Shared by the task pipeline and the workspace operations (``open``, git ops): open the folder
under the root, clone or pull its repository with the right token, place a task's input files,
take a baseline before the prompt and collect the changes (and their patch) after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from ocbridge.bridge.redact import Redactor
from ocbridge.bridge.storage.stores import ArtifactStore, KeyValueStore
from ocbridge.bridge.workspace.git import (
    Baseline,
    ChangeSet,
    GitError,
    GitSettings,
    RepoState,
    begin,
    collect,
    prepare,
    resolve_token,
)
from ocbridge.bridge.workspace.paths import Workspace, WorkspaceError, open_workspace, resolve_workspace_path
from ocbridge.client.protocol import ErrorType, EventGit, GitSpec, OcbridgeError

#: ``emit(event_type, git=EventGit, content=...)``: how git progress reaches the task's events.
GitEmit = Callable[..., Awaitable[None]]


class WorkspaceFailure(OcbridgeError):
    """The workspace could not be prepared; ``error_type`` goes into the error result."""

    default_error_type = ErrorType.WORKSPACE_ERROR


class WorkspaceFlow:
    """Workspace preparation and change collection with one set of git settings and secrets."""

    def __init__(
        self,
        *,
        root: Path,
        git: GitSettings,
        state: KeyValueStore,
        artifacts: ArtifactStore,
        redactor: Redactor,
    ) -> None:
        self.root = root
        self.git = git
        self._state = state
        self._artifacts = artifacts
        self._redactor = redactor
        default = git.default_token()
        if default:
            redactor.add(default)

    def path_of(self, name: str) -> Path:
        """The confined path of a workspace name (raises :class:`WorkspaceFailure`)."""
        try:
            return resolve_workspace_path(self.root, name)
        except WorkspaceError as exc:
            raise WorkspaceFailure(str(exc), ErrorType.INVALID_TASK) from None

    def open(self, name: str) -> Workspace:
        try:
            return open_workspace(self.root, name)
        except WorkspaceError as exc:
            raise WorkspaceFailure(str(exc), ErrorType.INVALID_TASK) from None
        except OSError as exc:
            raise WorkspaceFailure(f"cannot create workspace: {exc.strerror}", "workspace_error") from None

    @contextlib.asynccontextmanager
    async def token(
        self, url: str, token: str | None = None, token_from_kv: str | None = None
    ) -> AsyncIterator[str | None]:
        """The token for ``url`` (task token, a key of the state bucket, or the sidecar's), masked
        everywhere while in use."""
        if token is None and token_from_kv:
            raw = await self._state.get(token_from_kv)
            if raw is None:
                raise WorkspaceFailure(f"tokenFromKV: no key {token_from_kv!r} in the state bucket", "git_error")
            token = raw.decode().strip()
        resolved = resolve_token(self.git, url, token)
        self._redactor.add(resolved)
        try:
            yield resolved
        finally:
            self._redactor.remove(resolved)

    async def clone_or_pull(self, workspace: Workspace, spec: GitSpec, emit: GitEmit | None) -> RepoState:
        """Clone the repository into the workspace, or update the existing clone."""

        async def on_git(event_type: str, git: EventGit, content: str | None = None) -> None:
            if emit is not None:
                await emit(event_type, git=git, content=content)

        secret = spec.token.get_secret_value() if spec.token else None
        async with self.token(spec.url, secret, spec.token_from_kv) as token:
            try:
                return await prepare(
                    workspace.path, spec, settings=self.git, token=token, emit=on_git, redactor=self._redactor
                )
            except GitError as exc:
                raise WorkspaceFailure(self._redactor.text(str(exc)), exc.error_type) from None

    async def place_inputs(self, task_id: str, workspace: Workspace, names: list[str]) -> list[str]:
        """Copy ``input/<taskID>/<name>`` from the object store to ``<workspace>/<name>``."""
        placed = []
        for name in names:
            try:
                target = resolve_workspace_path(workspace.path, name)
            except WorkspaceError as exc:
                raise WorkspaceFailure(f"input file {name!r}: {exc}", ErrorType.INVALID_TASK) from None
            data = await self._artifacts.get(f"input/{task_id}/{name}")
            if data is None:
                raise WorkspaceFailure(
                    f"input file {name!r} is not staged under input/{task_id}/", ErrorType.INVALID_TASK
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            placed.append(str(target.relative_to(workspace.path)))
        return placed

    async def baseline(self, workspace: Workspace) -> Baseline:
        try:
            return await begin(workspace.path, settings=self.git, redactor=self._redactor)
        except GitError as exc:
            raise WorkspaceFailure(str(exc), exc.error_type) from None

    async def changes(self, workspace: Workspace, baseline: Baseline) -> ChangeSet:
        try:
            return await collect(workspace.path, baseline, settings=self.git, redactor=self._redactor)
        except GitError as exc:
            raise WorkspaceFailure(str(exc), exc.error_type) from None

    async def store_patch(self, task_id: str, changes: ChangeSet) -> str | None:
        """Keep the task's unified diff in the object store; returns its name (``None``: no changes).

        Secrets the sidecar knows are masked in it too: a token the agent wrote into a file must not
        travel further.
        """
        if not changes.patch:
            return None
        name = f"output/{task_id}/changes.patch"
        await self._artifacts.put(name, self._redactor.text(changes.patch).encode())
        return name
