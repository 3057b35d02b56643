"""Deterministic git operations on a workspace: branch, commit, push, status, diff — real hashes and
stats from git, pushed commits in the remote, no repository hook ever runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ocbridge.bridge.workspace.git import (
    GitError,
    GitInputError,
    GitSettings,
    branch,
    commit,
    diff,
    push,
    run_op,
    status,
)
from ocbridge.client.protocol import GitOpRequest, GitOpResult
from support.gitserver import Remote, git, make_remote, write

SETTINGS = GitSettings(allow_file_urls=True, user_name="Bridge Bot", user_email="bot@example.com")


@pytest.fixture
def remote(tmp_path) -> Remote:
    return make_remote(tmp_path / "remotes")


@pytest.fixture
def ws(tmp_path, remote) -> Path:
    path = tmp_path / "ws"
    git("clone", "-q", str(remote.bare), str(path))
    return path


async def test_branch_create_switch_and_previous(ws):
    made = await branch(ws, "topic/one", settings=SETTINGS)
    assert (made.ok, made.branch, made.previous_branch, made.created) == (True, "topic/one", "trunk", True)
    assert git("symbolic-ref", "--short", "HEAD", cwd=ws).strip() == "topic/one"
    back = await branch(ws, "trunk", create=False, settings=SETTINGS)
    assert (back.previous_branch, back.created) == ("topic/one", False)
    tracked = await branch(ws, "feature", create=False, settings=SETTINGS)  # only on origin so far
    assert tracked.created is False
    assert git("rev-parse", "--abbrev-ref", "feature@{upstream}", cwd=ws).strip() == "origin/feature"
    with pytest.raises(GitError, match="does not exist"):
        await branch(ws, "missing", create=False, settings=SETTINGS)
    with pytest.raises(GitInputError):
        await branch(ws, "-b", settings=SETTINGS)


async def test_commit_returns_gits_own_figures_and_runs_no_hooks(ws, tmp_path):
    marker = tmp_path / "hook-ran"
    for hook in ("pre-commit", "commit-msg", "post-commit"):
        path = ws / ".git" / "hooks" / hook
        path.write_text(f"#!/bin/sh\ntouch {marker}\n")
        path.chmod(0o755)
    write(ws, {"src/app.py": "def main():\n    return 42\n", "added.txt": "a\nb\nc\n", "README.md": None})
    result = await commit(ws, "-starts with a dash\n\nbody", settings=SETTINGS)
    assert result.commit_hash == git("rev-parse", "HEAD", cwd=ws).strip()
    numstat = git("show", "--numstat", "--format=", "HEAD", cwd=ws).split("\n")
    numbers = [line.split("\t") for line in numstat if line]
    assert result.files_changed == len(numbers) == 3
    assert result.insertions == sum(int(n[0]) for n in numbers)
    assert result.deletions == sum(int(n[1]) for n in numbers)
    assert {c.path: c.status for c in result.changes} == {"src/app.py": "modified", "added.txt": "added",
                                                          "README.md": "deleted"}
    assert git("log", "-1", "--format=%an <%ae>|%cn|%s", cwd=ws).strip() == \
        "Bridge Bot <bot@example.com>|Bridge Bot|-starts with a dash"
    assert not marker.exists()
    with pytest.raises(GitError, match="nothing to commit"):
        await commit(ws, "again", settings=SETTINGS)
    with pytest.raises(GitInputError):
        await commit(ws, "  ", settings=SETTINGS)


async def test_commit_without_add_all_takes_only_the_staged(ws):
    write(ws, {"staged.txt": "s\n", "unstaged.txt": "u\n"})
    git("add", "staged.txt", cwd=ws)
    result = await commit(ws, "only staged", add_all=False, author=("Ann", "ann@example.com"), settings=SETTINGS)
    assert [c.path for c in result.changes] == ["staged.txt"]
    assert "?? unstaged.txt" in git("status", "--porcelain", cwd=ws)


async def test_push_new_branch_and_rejection(ws, remote, tmp_path):
    await branch(ws, "work", settings=SETTINGS)
    (ws / "w.txt").write_text("w\n")
    made = await commit(ws, "work", settings=SETTINGS)
    pushed = await push(ws, set_upstream=True, settings=SETTINGS)
    assert (pushed.remote, pushed.branch, pushed.commit_hash, pushed.upstream) == ("origin", "work",
                                                                                  made.commit_hash, "origin/work")
    assert "new branch" in (pushed.message or "")
    assert remote.log("work")[0] == made.commit_hash
    assert git("rev-parse", "--abbrev-ref", "work@{upstream}", cwd=ws).strip() == "origin/work"
    # Someone else moves trunk: our trunk push is not a fast-forward.
    remote.commit({"other.txt": "x\n"}, "elsewhere")
    await branch(ws, "trunk", settings=SETTINGS)
    (ws / "mine.txt").write_text("m\n")
    await commit(ws, "mine", settings=SETTINGS)
    with pytest.raises(GitError, match="rejected"):
        await push(ws, settings=SETTINGS)
    with pytest.raises(GitInputError, match="allow_file_urls"):
        await push(ws, settings=GitSettings())


async def test_status_and_diff(ws):
    clean = await status(ws, settings=SETTINGS)
    assert (clean.branch, clean.dirty, clean.upstream, clean.ahead, clean.behind) == ("trunk", False, "origin/trunk",
                                                                                      0, 0)
    (ws / "new.txt").write_text("n\n")
    await commit(ws, "one ahead", settings=SETTINGS)
    write(ws, {"src/app.py": "changed\n", "untracked.txt": "u\n"})
    now = await status(ws, settings=SETTINGS)
    assert (now.dirty, now.ahead, now.behind) == (True, 1, 0)
    assert {c.path: c.status for c in now.changes} == {"src/app.py": "modified", "untracked.txt": "added"}
    assert now.patch is None
    result = await diff(ws, settings=SETTINGS)
    git("add", "-A", cwd=ws)
    assert result.patch == git("diff", "--cached", "-M", "HEAD", cwd=ws)
    older = await diff(ws, base="v1", settings=SETTINGS)
    assert "new.txt" in {c.path for c in older.changes}
    with pytest.raises(GitInputError):
        await diff(ws, base="--output=/tmp/x", settings=SETTINGS)


async def test_run_op_speaks_the_wire_models(ws):
    request = GitOpRequest.from_wire({"op": "branch", "branch": "wired", "session": "s1"})
    result = await run_op(ws, request, settings=SETTINGS)
    wire = result.to_dict()
    assert wire["ok"] and wire["previousBranch"] == "trunk" and wire["switchedTo"] == "wired"
    (ws / "f.txt").write_text("f\n")
    result = await run_op(ws, GitOpRequest.from_wire({"op": "commit", "message": "m", "addAll": True}),
                          settings=SETTINGS)
    assert result.to_dict()["filesChanged"] == 1 and len(result.to_dict()["commitHash"]) == 40
    failed = await run_op(ws, GitOpRequest(op="branch", branch="nope", create=False), settings=SETTINGS)
    assert (failed.ok, failed.error_type) == (False, "git_error") and "does not exist" in failed.error
    round_trip = GitOpResult.from_wire(failed.to_wire())
    assert round_trip == failed
    failed = await run_op(ws.parent, GitOpRequest(op="status"), settings=SETTINGS)
    assert (failed.ok, failed.error_type) == (False, "workspace_error")
