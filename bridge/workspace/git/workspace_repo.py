"""Get a task's workspace to the state ``workspace.git`` asks for: clone, or reuse and pull, then check out.

Policy, in short:

- An empty (or new) folder is cloned into. The branch is the task's ``branch`` or else the remote's
  default branch (whatever the remote's ``HEAD`` names; nothing assumes ``main``). ``ref`` (commit id
  or tag) is then checked out detached. ``shallow`` clones with ``--depth 1`` and fetches a ``ref``
  that is not in the shallow history on demand.
- A folder with files but no ``.git`` is refused: nothing is overwritten.
- An existing clone is reused only when its ``origin`` is the requested URL (compared without
  credentials, scheme/host case, default port and ``.git``); otherwise the task fails and nothing is
  touched. Credentials an older worker left in ``origin`` are removed from ``.git/config``.
- ``pull`` (unless ``false``): fetch, then fast-forward only. The pull never destroys or rewrites
  local work: when the branch has diverged, or uncommitted changes are in the way, the merge is
  skipped, the local state is kept and the ``git_pull`` event says why (the task goes on; a session's
  unpushed work from an earlier prompt is the usual cause and must not fail every later task).
- Events: ``git_clone`` after a clone, ``git_pull`` after a fetch, ``git_checkout`` when a branch or
  ref was switched to; each with the redacted URL, the branch (``None`` when detached) and the commit.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from ocbridge.bridge.redact import Redactor, default_redactor
from ocbridge.client.protocol import EventGit

from .errors import GitError
from .mirror import Mirror
from .repo import (
    current_branch,
    has_ref,
    head_commit,
    is_ancestor,
    is_repo,
    is_shallow,
    remote_url,
    resolve_commit,
    upstream,
)
from .runner import GitCredentials, GitResult, run_git
from .safety import (
    RemoteUrl,
    check_branch_name,
    check_ref,
    looks_like_object_id,
    normalize_url,
    parse_remote_url,
    redact_git_url,
)
from .settings import GitSettings, resolve_token


class Emit(Protocol):
    """Publishes one git event (``git_clone``/``git_pull``/``git_checkout``); ``content`` is an optional
    human-readable note (e.g. why a pull was skipped)."""

    async def __call__(self, event_type: str, git: EventGit, content: str | None = None) -> None: ...


class GitSpecLike(Protocol):
    """What :func:`prepare` reads from a task's ``workspace.git`` (:class:`client.protocol.GitSpec`)."""

    url: str
    branch: str | None
    ref: str | None
    pull: bool | None


@dataclass(slots=True)
class RepoState:
    """The workspace's git state once prepared."""

    #: The remote URL without credentials (safe to show).
    url: str
    branch: str | None
    commit: str | None
    action: Literal["cloned", "pulled", "reused"]
    #: The remote's default branch, when known (always after a clone).
    default_branch: str | None = None
    #: Why a requested pull did not fast-forward (diverged, local changes in the way), else ``None``.
    pull_skipped: str | None = None
    shallow: bool = False


@dataclass(slots=True)
class _Ctx:
    path: Path
    remote: RemoteUrl
    settings: GitSettings
    creds: GitCredentials
    redactor: Redactor
    emit: Emit | None
    shown_url: str
    #: Set when the workspace belongs to the agent's user: the remote is reached through it.
    mirror: Mirror | None = None

    async def git(self, args: list[str], *, timeout: float | None = None, check: bool = True) -> GitResult:
        return await run_git(args, self.path, settings=self.settings, timeout=timeout, check=check,
                             redactor=self.redactor)

    async def fetch(self, args: list[str], *, timeout: float | None = None, check: bool = True,
                    want: str | None = None) -> GitResult:
        """Run a ``git fetch`` from origin; through the mirror (brought up to date first, with
        ``want`` in it) when there is one."""
        timeout = self.settings.fetch_timeout if timeout is None else timeout
        if self.mirror is None:
            return await run_git(args, self.path, settings=self.settings, timeout=timeout, check=check,
                                 credentials=self.creds, redactor=self.redactor)
        failed = await self.mirror.refresh(credentials=self.creds, depth="--depth" in args,
                                           unshallow="--unshallow" in args, wants=[want] if want else [],
                                           check=check)
        if failed is not None:
            return failed
        return await self.mirror.agent_git(args, self.path, timeout=timeout, check=check)

    async def event(self, event_type: str, content: str | None = None) -> None:
        if self.emit is None:
            return
        branch = await current_branch(self.path, settings=self.settings, redactor=self.redactor)
        commit = await head_commit(self.path, settings=self.settings, redactor=self.redactor)
        git = EventGit(url=self.shown_url, branch=branch, commit=commit)
        if content is None:
            await self.emit(event_type, git)
        else:
            await self.emit(event_type, git, content=self.redactor.text(content))


async def prepare(
    path: Path,
    spec: GitSpecLike | Any,
    *,
    settings: GitSettings,
    token: str | None = None,
    emit: Emit | None = None,
    redactor: Redactor | None = None,
) -> RepoState:
    """Clone into, or reuse and update, the workspace at ``path`` (which must exist) per ``spec``.

    ``token`` is an already resolved token (e.g. read from KV for ``tokenFromKV``); without it, the
    spec's ``token``, a password in the URL, then the sidecar's default token are used. Raises
    :class:`GitError` (``errorType`` ``git_error``, ``workspace_error`` or ``invalid_task``) with a
    redacted message.
    """
    redactor = redactor or default_redactor
    remote = parse_remote_url(spec.url, settings, redactor=redactor)
    branch = await check_branch_name(spec.branch, redactor=redactor) if spec.branch else None
    ref = await check_ref(spec.ref, redactor=redactor) if spec.ref else None
    shallow = getattr(spec, "shallow", None)
    shallow = settings.shallow if shallow is None else bool(shallow)
    secret = token or resolve_token(settings, remote.url, getattr(spec, "token", None) or remote.secret)
    username = remote.username or settings.token_username
    if remote.secret:
        redactor.add(remote.secret)
    try:
        with GitCredentials(secret, remote.origin, username=username, redactor=redactor) as creds:
            mirror = Mirror(path, remote.url, settings=settings, redactor=redactor) if settings.agent else None
            ctx = _Ctx(path=path, remote=remote, settings=settings, creds=creds, redactor=redactor, emit=emit,
                       shown_url=redactor.text(redact_git_url(remote.url)), mirror=mirror)
            if is_repo(path):
                return await _reuse(ctx, branch=branch, ref=ref, pull=spec.pull is not False)
            return await _clone(ctx, branch=branch, ref=ref, shallow=shallow)
    finally:
        if remote.secret:
            redactor.remove(remote.secret)


async def _clone(ctx: _Ctx, *, branch: str | None, ref: str | None, shallow: bool) -> RepoState:
    path = ctx.path
    if path.exists() and any(path.iterdir()):
        raise GitError(f"workspace {path.name!r} already has files but is not a git clone: refusing to clone "
                       "into it (nothing was changed)", "workspace_error", redactor=ctx.redactor)
    path.mkdir(parents=True, exist_ok=True)
    args = ["clone", "--quiet"]
    if shallow:
        args += ["--depth", "1"]
    if branch:
        args += ["--branch", branch]
    args += ["--", ctx.remote.url, str(path)]
    try:
        if ctx.mirror is None:
            await run_git(args, path.parent, settings=ctx.settings, timeout=ctx.settings.clone_timeout,
                          credentials=ctx.creds, redactor=ctx.redactor)
        else:
            await ctx.mirror.clone(credentials=ctx.creds, branch=branch, shallow=shallow)
            await ctx.mirror.agent_git(args, path.parent, timeout=ctx.settings.clone_timeout)
    except BaseException:
        # The folder was empty before: whatever is in it now is a partial clone.
        _empty_folder(path)
        raise
    default = await _default_branch(ctx)
    await ctx.event("git_clone")
    if ref:
        await _checkout_ref(ctx, ref, may_fetch=True)
        await ctx.event("git_checkout")
    return RepoState(
        url=ctx.shown_url,
        branch=await current_branch(path, settings=ctx.settings, redactor=ctx.redactor),
        commit=await head_commit(path, settings=ctx.settings, redactor=ctx.redactor),
        action="cloned",
        default_branch=default,
        shallow=shallow,
    )


async def _reuse(ctx: _Ctx, *, branch: str | None, ref: str | None, pull: bool) -> RepoState:
    path, settings, redactor = ctx.path, ctx.settings, ctx.redactor
    origin = await remote_url(path, "origin", settings=settings, redactor=redactor)
    if origin is None:
        raise GitError(f"workspace {path.name!r} is a git repository without an 'origin' remote; expected a "
                       f"clone of {ctx.shown_url} (nothing was changed)", "workspace_error", redactor=redactor)
    if normalize_url(origin) != normalize_url(ctx.remote.url):
        raise GitError(f"workspace {path.name!r} already holds a clone of {redact_git_url(origin)}, not of "
                       f"{ctx.shown_url} (nothing was changed)", "workspace_error", redactor=redactor)
    if origin != ctx.remote.url and redact_git_url(origin) != origin:
        # Same repository, but credentials in .git/config (an older worker put tokens there).
        redactor.add(_url_secret(origin))
        await ctx.git(["remote", "set-url", "origin", "--", ctx.remote.url])

    skipped: str | None = None
    if pull:
        await ctx.fetch(["fetch", "--quiet", "--prune", "--", "origin"])
        if branch and not await has_ref(path, f"refs/remotes/origin/{branch}", settings=settings, redactor=redactor):
            await _fetch_other_branch(ctx, branch)

    switched = False
    if branch and await current_branch(path, settings=settings, redactor=redactor) != branch:
        await _switch_branch(ctx, branch, fetched=pull)
        switched = True
    if pull and ref is None:
        target = f"refs/remotes/origin/{branch}" if branch else await upstream(path, settings=settings,
                                                                                redactor=redactor)
        if target and await has_ref(path, target, settings=settings, redactor=redactor):
            skipped = await _fast_forward(ctx, target)
    if ref:
        head = await head_commit(path, settings=settings, redactor=redactor)
        was_detached = await current_branch(path, settings=settings, redactor=redactor) is None
        commit = await _checkout_ref(ctx, ref, may_fetch=pull)
        switched = switched or head != commit or not was_detached
    if pull:
        await ctx.event("git_pull", skipped)
    if switched:
        await ctx.event("git_checkout")
    return RepoState(
        url=ctx.shown_url,
        branch=await current_branch(path, settings=settings, redactor=redactor),
        commit=await head_commit(path, settings=settings, redactor=redactor),
        action="pulled" if pull else "reused",
        default_branch=await _default_branch(ctx),
        pull_skipped=skipped,
        shallow=await is_shallow(path, settings=settings, redactor=redactor),
    )


async def _fetch_other_branch(ctx: _Ctx, branch: str) -> None:
    """A single-branch (e.g. shallow) clone does not fetch other branches: fetch this one and add it
    to origin's fetch refspecs, so that it tracks origin and later pulls update it."""
    refspecs = (await ctx.git(["config", "--get-all", "remote.origin.fetch"], check=False)).stdout.split()
    if "+refs/heads/*:refs/remotes/origin/*" in refspecs:
        return  # already fetched everything: the branch does not exist on origin
    result = await ctx.fetch(["fetch", "--quiet", "--", "origin", f"+refs/heads/{branch}:refs/remotes/origin/{branch}"],
                             check=False)
    if result.code == 0:
        await ctx.git(["remote", "set-branches", "--add", "origin", branch])


async def _switch_branch(ctx: _Ctx, branch: str, *, fetched: bool) -> None:
    path, settings, redactor = ctx.path, ctx.settings, ctx.redactor
    if await has_ref(path, f"refs/heads/{branch}", settings=settings, redactor=redactor):
        await ctx.git(["checkout", "--quiet", branch, "--"])
    elif await has_ref(path, f"refs/remotes/origin/{branch}", settings=settings, redactor=redactor):
        await ctx.git(["checkout", "--quiet", "-b", branch, "--track", f"refs/remotes/origin/{branch}", "--"])
    else:
        hint = "" if fetched else " (pull is false, so nothing was fetched)"
        raise GitError(f"branch {branch!r} exists neither locally nor on origin{hint}", redactor=redactor)


async def _fast_forward(ctx: _Ctx, target: str) -> str | None:
    """Fast-forward the current branch to ``target``; the reason when that is not possible."""
    path, settings, redactor = ctx.path, ctx.settings, ctx.redactor
    head = await head_commit(path, settings=settings, redactor=redactor)
    goal = await resolve_commit(path, target, settings=settings, redactor=redactor)
    short = target.removeprefix("refs/remotes/")
    if goal is None or head == goal:
        return None
    if head is not None:
        if await is_ancestor(path, goal, head, settings=settings, redactor=redactor):
            return None  # local branch is ahead: nothing to pull
        if not await is_ancestor(path, head, goal, settings=settings, redactor=redactor):
            return f"pull skipped: the local branch and {short} have diverged; the local state was kept"
    result = await ctx.git(["merge", "--ff-only", "--quiet", goal], check=False)
    if result.code == 0:
        return None
    if "overwritten" in result.stderr or "untracked working tree" in result.stderr:
        return f"pull skipped: uncommitted changes would be overwritten by {short}; the local state was kept"
    raise GitError(f"fast-forward to {short} failed", stderr=result.stderr, code=result.code, redactor=redactor)


async def _checkout_ref(ctx: _Ctx, ref: str, *, may_fetch: bool) -> str:
    """Check out ``ref`` (commit id or tag) detached, fetching it first when it is not local."""
    path, settings, redactor = ctx.path, ctx.settings, ctx.redactor
    commit = await resolve_commit(path, ref, settings=settings, redactor=redactor)
    if commit is None and may_fetch:
        commit = await _fetch_ref(ctx, ref)
    if commit is None:
        raise GitError(f"ref {ref!r} not found in the repository", redactor=redactor)
    await ctx.git(["checkout", "--quiet", "--detach", commit, "--"])
    return commit


async def _fetch_ref(ctx: _Ctx, ref: str) -> str | None:
    """Fetch a tag or commit that a (shallow or single-branch) clone does not have."""
    shallow = await is_shallow(ctx.path, settings=ctx.settings, redactor=ctx.redactor)
    depth = ["--depth", "1"] if shallow else []
    # (fetch arguments, what the mirror must hold, what to resolve afterwards)
    attempts: list[tuple[list[str], str | None, str]] = []
    if not ref.startswith("refs/") and not looks_like_object_id(ref):
        attempts.append((["fetch", "--quiet", *depth, "--", "origin", f"+refs/tags/{ref}:refs/tags/{ref}"], None, ref))
    attempts.append((["fetch", "--quiet", *depth, "--", "origin", ref], ref, "FETCH_HEAD"))
    if shallow:
        # Last resort: the server refuses to serve an arbitrary commit; fetch the whole history.
        attempts.append((["fetch", "--quiet", "--unshallow", "--tags", "--", "origin"], None, ref))
    for args, want, name in attempts:
        result = await ctx.fetch(args, check=False, want=want)
        if result.code == 0:
            commit = await resolve_commit(ctx.path, name, settings=ctx.settings, redactor=ctx.redactor)
            if commit and (name != "FETCH_HEAD" or not looks_like_object_id(ref) or commit.startswith(ref.lower())):
                return commit
    return None


async def _default_branch(ctx: _Ctx) -> str | None:
    result = await ctx.git(["symbolic-ref", "-q", "--short", "refs/remotes/origin/HEAD"], check=False)
    name = result.stdout.strip()
    return name.removeprefix("origin/") if result.code == 0 and name else None


def _url_secret(url: str) -> str | None:
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        return parts.password or parts.username
    return None


def _empty_folder(path: Path) -> None:
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
