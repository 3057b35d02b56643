"""Deterministic git operations on a session's workspace: branch, commit, push, status, diff.

No prompt and no parsing of free text: every figure comes from git plumbing (``rev-parse``,
``diff-tree --numstat``, ``push --porcelain``...). Each function raises :class:`GitError` with a
redacted message; :func:`run_op` turns a :class:`GitOpRequest` into a :class:`GitOpResult` and never
raises for git failures (``ok=false``, ``error``, ``errorType``).
"""

from __future__ import annotations

from pathlib import Path

from ocbridge.bridge.redact import Redactor, default_redactor
from ocbridge.client.protocol import GitOpRequest, GitOpResult

from .changes import changes_since, diff_trees, empty_tree
from .errors import GitError, GitInputError
from .mirror import Mirror
from .repo import current_branch, has_ref, head_commit, is_repo, remote_url, remotes, upstream
from .runner import GitCredentials, run_git, summarize_stderr
from .safety import check_branch_name, check_ref, check_remote_name, parse_remote_url, redact_git_url
from .settings import GitSettings, resolve_token


def _require_repo(path: Path, redactor: Redactor | None) -> None:
    if not is_repo(path):
        raise GitError(f"workspace {path.name!r} is not a git repository", "workspace_error", redactor=redactor)


async def branch(path: Path, name: str, *, create: bool = True, settings: GitSettings | None = None,
                 redactor: Redactor | None = None) -> GitOpResult:
    """Switch to branch ``name``, creating it from ``HEAD`` when missing and ``create`` is true (a
    branch that exists only on ``origin`` is checked out tracking it). Uncommitted changes are
    carried over, as ``git switch`` does; a conflicting switch fails and changes nothing."""
    settings = settings or GitSettings()
    _require_repo(path, redactor)
    await check_branch_name(name, redactor=redactor)
    previous = await current_branch(path, settings=settings, redactor=redactor)
    if previous is None:
        previous = await head_commit(path, settings=settings, redactor=redactor)
    created = False
    if previous != name:
        if await has_ref(path, f"refs/heads/{name}", settings=settings, redactor=redactor):
            args = ["switch", "--quiet", "--no-guess", name]
        elif await has_ref(path, f"refs/remotes/origin/{name}", settings=settings, redactor=redactor):
            args = ["switch", "--quiet", "--track", "-c", name, f"refs/remotes/origin/{name}"]
        elif create:
            args, created = ["switch", "--quiet", "-c", name], True
        else:
            raise GitError(f"branch {name!r} does not exist (and create is false)", redactor=redactor)
        await run_git(args, path, settings=settings, redactor=redactor)
    return GitOpResult(ok=True, op="branch", branch=name, previous_branch=previous, created=created,
                       switched_to=name, commit=await head_commit(path, settings=settings, redactor=redactor))


async def commit(path: Path, message: str, *, add_all: bool = True, author: tuple[str, str] | None = None,
                 settings: GitSettings | None = None, redactor: Redactor | None = None) -> GitOpResult:
    """Commit (after ``git add --all`` when ``add_all``) as ``author`` (name, email) or the configured
    identity. Hooks do not run; signing is off. Fails when there is nothing to commit."""
    settings = settings or GitSettings()
    _require_repo(path, redactor)
    if not message or not message.strip():
        raise GitInputError("commit message is empty", redactor=redactor)
    if add_all:
        await run_git(["add", "--all"], path, settings=settings, redactor=redactor)
    staged = await run_git(["diff", "--cached", "--quiet"], path, settings=settings, check=False, redactor=redactor)
    if staged.code == 0:
        raise GitError("nothing to commit" + ("" if add_all else " (no staged changes; add_all is false)"),
                       redactor=redactor)
    name, email = author or (settings.user_name, settings.user_email)
    identity = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email,
                "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}
    # The message goes on stdin: never parsed as options, whatever it starts with.
    await run_git(["commit", "--quiet", "--no-verify", "--file=-"], path, settings=settings, env=identity,
                  config=["commit.gpgSign=false"], input=message.encode(), redactor=redactor)
    new = await head_commit(path, settings=settings, redactor=redactor)
    assert new is not None
    parent = await run_git(["rev-parse", "--verify", "-q", f"{new}^1"], path, settings=settings, check=False,
                           redactor=redactor)
    old = parent.stdout.strip() if parent.code == 0 else await empty_tree(path, settings=settings, redactor=redactor)
    changes, _, _ = await diff_trees(path, old, new, settings=settings, redactor=redactor)
    return GitOpResult(
        ok=True, op="commit", commit_hash=new, commit=new, message=message,
        branch=await current_branch(path, settings=settings, redactor=redactor),
        files_changed=len(changes),
        insertions=sum(c.insertions or 0 for c in changes),
        deletions=sum(c.deletions or 0 for c in changes),
        changes=changes,
    )


async def push(path: Path, *, remote: str = "origin", branch: str | None = None, set_upstream: bool = False,
               token: str | None = None, settings: GitSettings | None = None,
               redactor: Redactor | None = None) -> GitOpResult:
    """Push ``branch`` (default: the current one) to the configured remote ``remote``.

    The remote's push URL is checked like a task URL (an agent could have set it to ``ext::...``).
    ``token`` (else a password in the URL, else the sidecar's default token) is given to git through
    :class:`GitCredentials`. Rejections (non-fast-forward...) raise :class:`GitError`.
    """
    settings = settings or GitSettings()
    redactor = redactor or default_redactor
    _require_repo(path, redactor)
    await check_remote_name(remote, redactor=redactor)
    if remote not in await remotes(path, settings=settings, redactor=redactor):
        raise GitInputError(f"remote {remote!r} is not configured in the workspace", redactor=redactor)
    if branch is None:
        branch = await current_branch(path, settings=settings, redactor=redactor)
        if branch is None:
            raise GitError("HEAD is detached: name the branch to push", redactor=redactor)
    await check_branch_name(branch, redactor=redactor)
    if not await has_ref(path, f"refs/heads/{branch}", settings=settings, redactor=redactor):
        raise GitError(f"branch {branch!r} does not exist", redactor=redactor)
    url = await remote_url(path, remote, push=True, settings=settings, redactor=redactor) or ""
    checked = parse_remote_url(url, settings, redactor=redactor)
    secret = token or resolve_token(settings, checked.url, checked.secret)
    args = ["push", "--porcelain", *(["--set-upstream"] if set_upstream else []),
            "--", remote, f"refs/heads/{branch}:refs/heads/{branch}"]
    with GitCredentials(secret, checked.origin, username=checked.username or settings.token_username,
                        redactor=redactor) as creds:
        if settings.agent is None:
            result = await run_git(args, path, settings=settings, credentials=creds,
                                   timeout=settings.push_timeout, check=False, redactor=redactor)
        else:
            result = await Mirror(path, checked.url, settings=settings, redactor=redactor).push(
                branch, remote, credentials=creds)
            if result.code == 0 and set_upstream:
                await run_git(["config", f"branch.{branch}.remote", remote], path, settings=settings,
                              redactor=redactor)
                await run_git(["config", f"branch.{branch}.merge", f"refs/heads/{branch}"], path,
                              settings=settings, redactor=redactor)
        # Porcelain lines: "<flag>\t<from>:<to>\t<summary>"; flag "!" = rejected.
        lines = [line.split("\t")[:3] for line in result.stdout.splitlines() if line.count("\t") >= 2]
        summary = "; ".join(f"{ref.split(':')[-1]} {text}" for _, ref, text in lines)
        if result.code != 0:
            rejected = "; ".join(f"{ref.split(':')[-1]} {text}" for flag, ref, text in lines if flag == "!")
            reason = rejected or summarize_stderr(result.stderr) or f"exit code {result.code}"
            raise GitError(f"git push to {remote} ({redact_git_url(checked.url)}) failed: {reason}",
                           stderr=result.stderr, code=result.code, redactor=redactor)
    return GitOpResult(ok=True, op="push", remote=remote, branch=branch,
                       commit_hash=await head_commit(path, settings=settings, redactor=redactor),
                       message=redactor.text(summary) or "pushed",
                       upstream=f"{remote}/{branch}" if set_upstream else None)


async def status(path: Path, *, settings: GitSettings | None = None, redactor: Redactor | None = None) -> GitOpResult:
    """Branch, ``HEAD``, dirtiness, upstream with ahead/behind counts, and the uncommitted changes."""
    settings = settings or GitSettings()
    _require_repo(path, redactor)
    changes = await changes_since(path, "HEAD", settings=settings, redactor=redactor, max_patch_bytes=0)
    up = await upstream(path, settings=settings, redactor=redactor)
    ahead = behind = None
    if up and changes.commit:
        counts = await run_git(["rev-list", "--left-right", "--count", f"HEAD...{up}"], path, settings=settings,
                               redactor=redactor)
        ahead, behind = (int(n) for n in counts.stdout.split())
    return GitOpResult(ok=True, op="status", branch=changes.branch, commit=changes.commit, dirty=changes.dirty,
                       upstream=up.removeprefix("refs/remotes/") if up else None, ahead=ahead, behind=behind,
                       changes=changes.changes, files_changed=len(changes.changes),
                       insertions=changes.insertions, deletions=changes.deletions)


async def diff(path: Path, *, base: str | None = None, settings: GitSettings | None = None,
               redactor: Redactor | None = None, max_patch_bytes: int | None = None) -> GitOpResult:
    """The work tree (untracked files included) against ``base`` (default ``HEAD``): changes and patch."""
    settings = settings or GitSettings()
    _require_repo(path, redactor)
    if base is not None:
        await check_ref(base, redactor=redactor)
    changes = await changes_since(path, base or "HEAD", settings=settings, redactor=redactor,
                                  max_patch_bytes=max_patch_bytes)
    return GitOpResult(ok=True, op="diff", branch=changes.branch, commit=changes.commit, dirty=changes.dirty,
                       changes=changes.changes, patch=changes.patch, patch_truncated=changes.patch_truncated,
                       files_changed=len(changes.changes), insertions=changes.insertions,
                       deletions=changes.deletions)


async def run_op(path: Path, request: GitOpRequest, *, settings: GitSettings | None = None,
                 token: str | None = None, author: tuple[str, str] | None = None,
                 redactor: Redactor | None = None) -> GitOpResult:
    """Run ``request`` on the workspace at ``path``; git failures become ``ok=false`` results.

    ``token`` is the resolved token for a push (the request's own token is used when ``None``).
    """
    settings = settings or GitSettings()
    try:
        match request.op:
            case "branch":
                if not request.branch:
                    raise GitInputError("branch: 'branch' is required", redactor=redactor)
                return await branch(path, request.branch, create=request.create is not False, settings=settings,
                                    redactor=redactor)
            case "commit":
                return await commit(path, request.message or "", add_all=request.add_all is not False,
                                    author=author, settings=settings, redactor=redactor)
            case "push":
                if token is None and request.token is not None:
                    token = request.token.get_secret_value()
                return await push(path, remote=request.remote or "origin", branch=request.branch,
                                  set_upstream=bool(request.set_upstream), token=token, settings=settings,
                                  redactor=redactor)
            case "status":
                return await status(path, settings=settings, redactor=redactor)
            case "diff":
                return await diff(path, base=request.base, settings=settings, redactor=redactor)
    except GitError as exc:
        return GitOpResult(ok=False, op=request.op, error=exc.message, error_type=exc.error_type,
                           branch=request.branch, remote=request.remote)
    raise GitInputError(f"unknown git operation {request.op!r}", redactor=redactor)
