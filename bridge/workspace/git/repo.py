"""Read-only questions about a repository (current branch, HEAD, remotes...), answered by git.

Through the hardened runner (:func:`.runner.run_git`), not GitPython, although these are only reads:

- GitPython parses refs and object ids itself and knows only SHA-1 ids of exactly 40 digits. In a
  SHA-256 repository (which this layer handles end to end) ``Repo.head.commit``, and even
  ``Repo.head.is_detached`` on a detached ``HEAD``, raise ``ValueError``. It does not read reftable
  refs either (git >= 2.45, chosen by ``init.defaultRefFormat`` in the operator's ``~/.gitconfig``):
  there ``HEAD`` is the stub ``ref: refs/heads/.invalid``.
- ``git remote get-url`` gives the URL git will really contact (``pushurl``, ``insteadOf`` applied),
  which is what :func:`.operations.push` must check; GitPython returns the raw value from its own
  config parser, which is not git's and reads a file the agent can write.
- The git processes GitPython starts get ``os.environ`` plus overrides: its API can set variables but
  not remove the inherited ones (``GIT_DIR``, ``GIT_INDEX_FILE``, ``GIT_CONFIG_*``, the sidecar's
  secrets) that :func:`.runner.git_env` leaves out.
"""

from __future__ import annotations

from pathlib import Path

from ocbridge.bridge.redact import Redactor

from .runner import run_git
from .settings import GitSettings


def is_repo(path: Path) -> bool:
    """Whether ``path`` is the top of a git work tree (``.git`` directory, or file for worktrees)."""
    return (path / ".git").exists()


async def head_commit(path: Path, *, settings: GitSettings | None = None,
                      redactor: Redactor | None = None) -> str | None:
    """Full id of ``HEAD``, or ``None`` in a repository without commits."""
    result = await run_git(["rev-parse", "--verify", "-q", "HEAD^{commit}"], path, settings=settings,
                           check=False, redactor=redactor)
    return result.stdout.strip() or None if result.code == 0 else None


async def current_branch(path: Path, *, settings: GitSettings | None = None,
                         redactor: Redactor | None = None) -> str | None:
    """Short name of the checked-out branch, or ``None`` on a detached ``HEAD``."""
    result = await run_git(["symbolic-ref", "-q", "--short", "HEAD"], path, settings=settings,
                           check=False, redactor=redactor)
    return result.stdout.strip() or None if result.code == 0 else None


async def resolve_commit(path: Path, rev: str, *, settings: GitSettings | None = None,
                         redactor: Redactor | None = None) -> str | None:
    """Commit id ``rev`` names (``rev`` must already be checked: it cannot start with ``-``)."""
    result = await run_git(["rev-parse", "--verify", "-q", "--end-of-options", f"{rev}^{{commit}}"], path,
                           settings=settings, check=False, redactor=redactor)
    return result.stdout.strip() or None if result.code == 0 else None


async def has_ref(path: Path, ref: str, *, settings: GitSettings | None = None,
                  redactor: Redactor | None = None) -> bool:
    """Whether the full ref name ``ref`` (``refs/...``) exists."""
    result = await run_git(["show-ref", "--verify", "-q", ref], path, settings=settings, check=False,
                           redactor=redactor)
    return result.code == 0


async def remote_url(path: Path, remote: str = "origin", *, push: bool = False,
                     settings: GitSettings | None = None, redactor: Redactor | None = None) -> str | None:
    """The (push) URL configured for ``remote``, or ``None`` when there is no such remote."""
    # ``--``: the remote name may come from a request and is checked later (by ``push``).
    args = ["remote", "get-url", *(["--push"] if push else []), "--", remote]
    result = await run_git(args, path, settings=settings, check=False, redactor=redactor)
    return result.stdout.strip() or None if result.code == 0 else None


async def remotes(path: Path, *, settings: GitSettings | None = None, redactor: Redactor | None = None) -> list[str]:
    """Names of the configured remotes."""
    result = await run_git(["remote"], path, settings=settings, redactor=redactor)
    return result.stdout.split()


async def upstream(path: Path, *, settings: GitSettings | None = None,
                   redactor: Redactor | None = None) -> str | None:
    """Full ref of the current branch's upstream (``refs/remotes/origin/x``), if any."""
    result = await run_git(["rev-parse", "--symbolic-full-name", "-q", "--verify", "@{upstream}"], path,
                           settings=settings, check=False, redactor=redactor)
    return result.stdout.strip() or None if result.code == 0 else None


async def is_ancestor(path: Path, older: str, newer: str, *, settings: GitSettings | None = None,
                      redactor: Redactor | None = None) -> bool:
    """Whether commit ``older`` is reachable from ``newer`` (both full ids or checked refs)."""
    result = await run_git(["merge-base", "--is-ancestor", older, newer], path, settings=settings,
                           check=False, redactor=redactor)
    return result.code == 0


async def is_dirty(path: Path, *, settings: GitSettings | None = None, redactor: Redactor | None = None) -> bool:
    """Uncommitted changes, staged or not, or untracked files that are not ignored."""
    result = await run_git(["status", "--porcelain=v1", "-z", "--untracked-files=normal"], path,
                           settings=settings, redactor=redactor)
    return bool(result.stdout)


async def is_shallow(path: Path, *, settings: GitSettings | None = None, redactor: Redactor | None = None) -> bool:
    """Whether the clone is shallow (its history cut by ``--depth``)."""
    result = await run_git(["rev-parse", "--is-shallow-repository"], path, settings=settings, redactor=redactor)
    return result.stdout.strip() == "true"
