"""Getting a workspace ready for work and reporting what the work changed.

Shared by the task pipeline and the workspace operations (``open``, git ops): open the folder
under the root, clone or pull its repository with the right token, place a task's input files,
take a baseline before the prompt and collect the changes (and their patch) after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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
    parse_remote_url,
    prepare,
    resolve_token,
    still_comparable,
)
from ocbridge.bridge.workspace.paths import (
    Workspace,
    WorkspaceError,
    confine,
    open_workspace,
    relative_parts,
    resolve_workspace_path,
    write_file,
)
from ocbridge.client.protocol import ErrorType, EventGit, GitSpec, OcbridgeError

from .baselines import BaselineStore

log = logging.getLogger(__name__)

#: A kept snapshot baseline holding at most this much content is written on the event loop.
INLINE_KEEP_BYTES = 64 * 1024

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
        baselines: BaselineStore | None = None,
    ) -> None:
        self.root = root
        self.git = git
        self._baselines = baselines
        self._state = state
        self._artifacts = artifacts
        self._redactor = redactor
        default = git.default_token()
        if default:
            redactor.add(default)

    def path_of(self, name: str) -> Path:
        """The real path of a workspace name, confined under the root (symlinks included); the
        folder need not exist. Raises :class:`WorkspaceFailure`."""
        try:
            return confine(self.root, resolve_workspace_path(self.root, name), f"workspace {name!r}:")
        except WorkspaceError as exc:
            raise WorkspaceFailure(str(exc), ErrorType.INVALID_TASK) from None

    def confined(self, stored: str, owner: str) -> Path:
        """The real path of a workspace path read back from a store (a session's ``workspacePath``),
        refused unless it lies under the root: a foreign or corrupt record must never make git or a
        deletion run elsewhere. ``owner`` names the record in the error (``session 'x'``)."""
        try:
            return confine(self.root, stored, f"{owner}: the recorded workspace")
        except WorkspaceError as exc:
            raise WorkspaceFailure(f"{exc}; refused (open the session again to give it a workspace)",
                                   ErrorType.WORKSPACE_ERROR) from None

    def open(self, name: str) -> Workspace:
        """Create (or reuse) the workspace folder for ``name``; it belongs to the agent's user when
        there is one (a folder from before ``agent_user`` was set is given to it whole)."""
        try:
            workspace = open_workspace(self.root, name)
            agent = self.git.agent
            if agent is not None and workspace.path.lstat().st_uid != agent.uid:
                agent.reach(workspace.path, Path(os.path.realpath(self.root)))
                agent.own_tree(workspace.path)
            return workspace
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
            token = await self._kv_token(url, token_from_kv)
        resolved = resolve_token(self.git, url, token)
        self._redactor.add(resolved)
        try:
            yield resolved
        finally:
            self._redactor.remove(resolved)

    async def _kv_token(self, url: str, key: str) -> str:
        """The token stored under ``key`` in the state bucket, for ``url``.

        Like the sidecar's own token, it is only sent to the hosts in ``git.token_hosts`` (when that
        list is set): a task names both the key and the URL, so without this check it could send any
        value of the bucket to a host of its choosing. The host is checked before the value is read,
        and the value never appears in an error.
        """
        if url:
            try:
                origin = parse_remote_url(url, self.git, redactor=self._redactor).origin
            except GitError as exc:
                raise WorkspaceFailure(exc.message, exc.error_type) from None
            # ``origin`` is None for ssh/git/file URLs: git never sends a token there.
            if origin is not None and not self.git.token_allowed_for(origin):
                allowed = ", ".join(self.git.token_hosts)
                raise WorkspaceFailure(
                    f"tokenFromKV {key!r} refused: {origin} is not in git.token_hosts ({allowed}); a token "
                    "from the state bucket is only sent to those hosts", ErrorType.INVALID_TASK)
        raw = await self._state.get(key)
        if raw is None:
            raise WorkspaceFailure(f"tokenFromKV: no key {key!r} in the state bucket", ErrorType.GIT_ERROR)
        try:
            token = raw.decode().strip()
        except UnicodeDecodeError:
            raise WorkspaceFailure(f"tokenFromKV: the value of {key!r} is not UTF-8 text",
                                   ErrorType.GIT_ERROR) from None
        if not token:
            raise WorkspaceFailure(f"tokenFromKV: the value of {key!r} is empty", ErrorType.GIT_ERROR)
        return token

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
        """Copy ``input/<taskID>/<name>`` from the object store to ``<workspace>/<name>``.

        The name is confined to the workspace, and the file is written without following any link
        (a symlink left by the agent or a cloned repository, ``docs -> /home/u/.ssh``, is refused).
        """
        placed = []
        for name in names:
            try:
                relative_parts(workspace.path, name, "input file", "the workspace")
            except WorkspaceError as exc:
                raise WorkspaceFailure(str(exc), ErrorType.INVALID_TASK) from None
            try:
                data = await self._artifacts.get(f"input/{task_id}/{name}")
            except ValueError as exc:  # a folder store refusing the name
                raise WorkspaceFailure(f"input file {name!r}: {exc}", ErrorType.INVALID_TASK) from None
            if data is None:
                raise WorkspaceFailure(
                    f"input file {name!r} is not staged under input/{task_id}/", ErrorType.INVALID_TASK
                )
            try:
                agent = self.git.agent
                owner = (agent.uid, agent.gid) if agent is not None else None
                placed.append(await asyncio.to_thread(write_file, workspace.path, name, data, owner=owner))
            except WorkspaceError as exc:
                raise WorkspaceFailure(str(exc), ErrorType.INVALID_TASK) from None
            except OSError as exc:
                raise WorkspaceFailure(f"input file {name!r}: cannot write it: {exc.strerror}",
                                       ErrorType.WORKSPACE_ERROR) from None
        return placed

    async def baseline(self, workspace: Workspace, *, delivery: str | None = None, attempt: int = 1) -> Baseline:
        """The workspace before the prompt. With ``delivery`` (the task message) the baseline is
        kept until :meth:`forget_baseline`, and a later attempt on this box starts from the one the
        first attempt took (see :mod:`.baselines`)."""
        if delivery is not None and attempt > 1 and self._baselines is not None:
            kept = self._baselines.get(delivery, workspace.path)
            if kept is not None and await still_comparable(workspace.path, kept, settings=self.git,
                                                           redactor=self._redactor):
                log.info("task %s: changes are counted from the first attempt's baseline", delivery.split()[0])
                return kept
        try:
            baseline = await begin(workspace.path, settings=self.git, redactor=self._redactor)
        except GitError as exc:
            raise WorkspaceFailure(str(exc), exc.error_type) from None
        if delivery is not None and self._baselines is not None:
            small = baseline.snapshot is None or baseline.snapshot.size <= INLINE_KEEP_BYTES
            if small:  # a file write of a few KiB: cheaper than a thread hand-off
                self._baselines.put(delivery, baseline)
            else:
                await asyncio.to_thread(self._baselines.put, delivery, baseline)
        return baseline

    def forget_baseline(self, delivery: str) -> None:
        """The task message has its result: its kept baseline is not needed any more."""
        if self._baselines is not None:
            self._baselines.discard(delivery)

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
