"""What a task changed in its workspace: the file list with line counts, and the unified diff.

Git workspaces: the whole work tree (committed, staged, unstaged and untracked-but-not-ignored
files) is written as a tree object through a throwaway index (``GIT_INDEX_FILE`` in a private temp
dir, seeded with a copy of the real index so unchanged files are not re-hashed). :func:`begin` does
it before the prompt, :func:`collect` after; the two trees are compared by ``git diff-tree -M``.
So the changes are exactly the task's, even when the work tree was already dirty before, the agent
committed during the run, or it switched branches; the user's real index is never touched.

Non-git workspaces: a before/after snapshot of the tree (see :mod:`.snapshot`).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from ocbridge.bridge.agent_user import AgentUser, copy_agent_file
from ocbridge.bridge.redact import Redactor
from ocbridge.client.protocol import FileChange, ResultGit

from . import snapshot
from .errors import GitError
from .repo import current_branch, head_commit, is_repo
from .runner import run_git
from .settings import GitSettings

T = TypeVar("T")

_STATUS = {"A": "added", "M": "modified", "T": "modified", "D": "deleted", "R": "renamed", "C": "added"}


@dataclass(slots=True)
class Baseline:
    """The workspace before the prompt."""

    kind: Literal["git", "snapshot"]
    root: Path
    #: git: ``HEAD`` at the start (``None`` without commits) and the tree of the whole work tree.
    commit: str | None = None
    tree: str | None = None
    snapshot: snapshot.Snapshot | None = None


@dataclass(slots=True)
class ChangeSet:
    """The task's changes, and (git only) the branch, commit and dirtiness afterwards."""

    changes: list[FileChange] = field(default_factory=list)
    patch: str = ""
    patch_truncated: bool = False
    git: bool = False
    branch: str | None = None
    commit: str | None = None
    dirty: bool | None = None

    @property
    def insertions(self) -> int:
        return sum(c.insertions or 0 for c in self.changes)

    @property
    def deletions(self) -> int:
        return sum(c.deletions or 0 for c in self.changes)

    def result_git(self) -> ResultGit | None:
        """The result's ``workspace.git`` (``None`` for a non-git workspace)."""
        return ResultGit(branch=self.branch, commit=self.commit, dirty=self.dirty) if self.git else None


async def begin(path: Path, *, settings: GitSettings | None = None, redactor: Redactor | None = None,
                mode: Literal["auto", "git", "snapshot"] = "auto") -> Baseline:
    """Record the workspace's state before the prompt (``mode`` forces one method; ``auto`` picks git
    when ``path`` is the top of a git work tree)."""
    settings = settings or GitSettings()
    if mode == "git" or (mode == "auto" and is_repo(path)):
        commit = await head_commit(path, settings=settings, redactor=redactor)
        tree = await worktree_tree(path, settings=settings, redactor=redactor)
        return Baseline(kind="git", root=path, commit=commit, tree=tree)
    snap = await _small_inline(snapshot.take, path, snapshot.default_cache.get(path), settings.snapshot_file_limit,
                               budget=settings.snapshot_budget)
    return Baseline(kind="snapshot", root=path, snapshot=snap)


async def still_comparable(path: Path, baseline: Baseline, *, settings: GitSettings | None = None,
                           redactor: Redactor | None = None) -> bool:
    """Whether a baseline taken earlier (kept for a later attempt) can still be compared with the
    workspace: a git one needs the repository and the tree it recorded (a workspace removed and
    cloned again in between has neither)."""
    if baseline.kind != "git":
        return True
    if not is_repo(path):
        return False
    if baseline.tree is None:
        return True
    found = await run_git(["cat-file", "-e", f"{baseline.tree}^{{tree}}"], path, settings=settings or GitSettings(),
                          check=False, redactor=redactor)
    return found.code == 0


async def _small_inline(job: Callable[..., T], path: Path, previous: snapshot.Snapshot | None, file_limit: int,
                        **options: Any) -> T:
    """``job(path, file_limit=..., walked=..., **options)``: on the event loop when the tree is small
    and little is left to read (cheaper than a thread hand-off), else in a worker thread."""
    walked = snapshot.walk_if_small(path, previous)  # None when previous is None
    if walked is not None and previous is not None and (
            snapshot.reads_needed(walked, previous, file_limit) <= snapshot.INLINE_READ_BYTES):
        return job(path, file_limit=file_limit, walked=walked, **options)
    return await asyncio.to_thread(job, path, file_limit=file_limit, walked=walked, **options)


async def collect(path: Path, baseline: Baseline, *, settings: GitSettings | None = None,
                  redactor: Redactor | None = None, max_patch_bytes: int | None = None) -> ChangeSet:
    """The changes since ``baseline``, with the unified diff (cut at ``max_patch_bytes``)."""
    settings = settings or GitSettings()
    limit = settings.max_patch_bytes if max_patch_bytes is None else max_patch_bytes
    if baseline.kind == "snapshot":
        assert baseline.snapshot is not None
        changes, patch, truncated = await _small_inline(
            snapshot.compare, path, baseline.snapshot, settings.snapshot_file_limit,
            before=baseline.snapshot, max_patch_bytes=limit,
        )
        return ChangeSet(changes=changes, patch=patch, patch_truncated=truncated)
    if not is_repo(path):
        raise GitError(f"workspace {path.name!r} is no longer a git repository", "workspace_error",
                       redactor=redactor)
    after = await worktree_tree(path, settings=settings, redactor=redactor)
    base = baseline.tree or await empty_tree(path, settings=settings, redactor=redactor)
    return await _changeset(path, base, after, settings=settings, redactor=redactor, max_patch_bytes=limit)


async def changes_since(path: Path, rev: str = "HEAD", *, settings: GitSettings | None = None,
                        redactor: Redactor | None = None, max_patch_bytes: int | None = None) -> ChangeSet:
    """Changes of the whole work tree (untracked files included) against commit ``rev`` (checked by
    the caller), e.g. ``HEAD`` for "what is not committed yet"."""
    settings = settings or GitSettings()
    limit = settings.max_patch_bytes if max_patch_bytes is None else max_patch_bytes
    result = await run_git(["rev-parse", "--verify", "-q", "--end-of-options", f"{rev}^{{tree}}"], path,
                           settings=settings, check=False, redactor=redactor)
    base = result.stdout.strip() if result.code == 0 else None
    if base is None:
        if rev != "HEAD":
            raise GitError(f"{rev!r} is not a commit in this repository", redactor=redactor)
        base = await empty_tree(path, settings=settings, redactor=redactor)
    after = await worktree_tree(path, settings=settings, redactor=redactor)
    return await _changeset(path, base, after, settings=settings, redactor=redactor, max_patch_bytes=limit)


async def _changeset(path: Path, base: str, after: str, *, settings: GitSettings, redactor: Redactor | None,
                     max_patch_bytes: int) -> ChangeSet:
    changes, patch, truncated = await diff_trees(path, base, after, settings=settings, redactor=redactor,
                                                 patch=True, max_patch_bytes=max_patch_bytes)
    head_tree = await run_git(["rev-parse", "--verify", "-q", "HEAD^{tree}"], path, settings=settings,
                              check=False, redactor=redactor)
    clean = head_tree.stdout.strip() or await empty_tree(path, settings=settings, redactor=redactor)
    return ChangeSet(
        changes=changes,
        patch=patch,
        patch_truncated=truncated,
        git=True,
        branch=await current_branch(path, settings=settings, redactor=redactor),
        commit=await head_commit(path, settings=settings, redactor=redactor),
        # Same meaning as a non-empty `git status`: the work tree differs from HEAD.
        dirty=after != clean,
    )


async def worktree_tree(path: Path, *, settings: GitSettings | None = None, redactor: Redactor | None = None) -> str:
    """Tree id of the work tree as ``git add -A`` would stage it, built in a throwaway index."""
    settings = settings or GitSettings()
    index = (await run_git(["rev-parse", "--git-path", "index"], path, settings=settings,
                           redactor=redactor)).stdout.strip()
    real_index = Path(index) if Path(index).is_absolute() else path / index
    agent = settings.agent
    # The agent's git writes the index: then in a folder of the agent's user.
    with agent.scratch() if agent is not None else tempfile.TemporaryDirectory(prefix="ocbridge-index-") as tmp:
        temp_index = Path(tmp) / "index"
        if real_index.exists():
            await asyncio.to_thread(_copy_index, real_index, temp_index, agent)
        env = {"GIT_INDEX_FILE": str(temp_index)}
        added = await run_git(["add", "--all", "--ignore-errors"], path, settings=settings, env=env, check=False,
                              redactor=redactor)
        if added.code not in (0, 1):
            raise GitError("cannot read the work tree: git add failed", stderr=added.stderr, redactor=redactor)
        tree = await run_git(["write-tree"], path, settings=settings, env=env, redactor=redactor)
    return tree.stdout.strip()


def _copy_index(source: Path, target: Path, agent: AgentUser | None) -> None:
    """Copy the index keeping its times (git's racy-clean check then trusts the cached stat data);
    from an agent-owned repository without following a link it may have put there."""
    if agent is None:
        shutil.copy2(source, target)
        return
    copy_agent_file(source, target, owner=agent, keep_times=True)


async def empty_tree(path: Path, *, settings: GitSettings | None = None, redactor: Redactor | None = None) -> str:
    """Id of the empty tree in this repository's hash (sha1 or sha256)."""
    result = await run_git(["hash-object", "-t", "tree", "/dev/null"], path, settings=settings, redactor=redactor)
    return result.stdout.strip()


async def diff_trees(
    path: Path,
    old: str,
    new: str,
    *,
    settings: GitSettings | None = None,
    redactor: Redactor | None = None,
    patch: bool = False,
    max_patch_bytes: int | None = None,
) -> tuple[list[FileChange], str, bool]:
    """Files changed between two trees (or commits), with rename detection, and optionally the patch."""
    common = ["diff-tree", "-r", "-M", "-z", "--no-commit-id"]
    numstat = await run_git([*common, "--numstat", old, new], path, settings=settings, redactor=redactor)
    statuses = await run_git([*common, "--name-status", old, new], path, settings=settings, redactor=redactor)
    changes = merge_stats(parse_name_status(statuses.stdout), parse_numstat(numstat.stdout))
    text, truncated = "", False
    if patch and changes:
        result = await run_git(["diff-tree", "-r", "-M", "-p", "--no-commit-id", old, new], path,
                               settings=settings, redactor=redactor, max_stdout=max_patch_bytes)
        text, truncated = result.stdout, result.truncated
        if truncated:
            text = text[: text.rfind("\n") + 1]
    return changes, text, truncated


def parse_name_status(out: str) -> list[tuple[str, str, str | None]]:
    """``git diff --name-status -z`` -> ``[(status, path, old_path)]``."""
    parts = out.split("\0")
    found: list[tuple[str, str, str | None]] = []
    i = 0
    while i < len(parts) and parts[i]:
        code = parts[i][0]
        status = _STATUS.get(code, "modified")
        if code in "RC":
            found.append((status, parts[i + 2], parts[i + 1] if code == "R" else None))
            i += 3
        else:
            found.append((status, parts[i + 1], None))
            i += 2
    return found


def parse_numstat(out: str) -> dict[str, tuple[int | None, int | None]]:
    """``git diff --numstat -z`` -> ``{new path: (insertions, deletions)}`` (``None`` for binary)."""
    parts = out.split("\0")
    stats: dict[str, tuple[int | None, int | None]] = {}
    i = 0
    while i < len(parts) and parts[i]:
        added, deleted, name = parts[i].split("\t", 2)
        if name == "":  # rename/copy: old and new path follow
            name = parts[i + 2]
            i += 3
        else:
            i += 1
        stats[name] = (None if added == "-" else int(added), None if deleted == "-" else int(deleted))
    return stats


def merge_stats(statuses: list[tuple[str, str, str | None]],
                stats: dict[str, tuple[int | None, int | None]]) -> list[FileChange]:
    """One :class:`FileChange` per file, sorted by path."""
    changes = []
    for status, name, old in statuses:
        ins, dels = stats.get(name, (0, 0))
        binary = ins is None and dels is None
        changes.append(FileChange(path=name, status=status, insertions=ins, deletions=dels, old_path=old,
                                  binary=True if binary else None))
    return sorted(changes, key=lambda c: c.path)
