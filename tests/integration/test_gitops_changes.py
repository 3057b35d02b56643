"""What a task changed: from git for git workspaces (matching ``git diff``), from before/after
snapshots otherwise (only the touched files), with a unified diff that applies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ocbridge.bridge.workspace.git import GitSettings, begin, collect
from support.gitserver import git, make_remote, write


@pytest.fixture
def clone(tmp_path) -> Path:
    remote = make_remote(tmp_path / "remotes")
    ws = tmp_path / "ws"
    git("clone", "-q", str(remote.bare), str(ws))
    write(ws, {"docs/guide.md": "".join(f"line {i}\n" for i in range(30))})
    git("add", "-A", cwd=ws)
    git("commit", "-q", "-m", "guide", cwd=ws)
    return ws


def git_view(ws: Path, base: str) -> tuple[list[tuple], str]:
    """What git itself says about everything since ``base`` (staged in the real index to ask it)."""
    git("add", "-A", cwd=ws)
    numstat = git("diff", "--cached", "-M", "--numstat", base, cwd=ws)
    statuses = git("diff", "--cached", "-M", "--name-status", base, cwd=ws)
    patch = git("diff", "--cached", "-M", "--no-color", base, cwd=ws)
    codes = {"A": "added", "M": "modified", "D": "deleted", "R": "renamed"}
    rows = []
    for stat_line, status_line in zip(numstat.splitlines(), statuses.splitlines(), strict=True):
        ins, dels, _ = stat_line.split("\t", 2)
        fields = status_line.split("\t")
        path, old = (fields[2], fields[1]) if fields[0].startswith("R") else (fields[1], None)
        rows.append((path, codes[fields[0][0]], None if ins == "-" else int(ins), None if dels == "-" else int(dels),
                     old))
    return sorted(rows), patch


def rows(changes) -> list[tuple]:
    return sorted((c.path, c.status, c.insertions, c.deletions, c.old_path) for c in changes)


async def test_git_changes_match_git_diff(clone):
    base = git("rev-parse", "HEAD", cwd=clone).strip()
    baseline = await begin(clone)
    assert baseline.kind == "git" and baseline.commit == base
    # The "agent": edit, add, delete, rename (with an edit), binary change, and one commit mid-way.
    write(clone, {"src/app.py": "def main():\n    return 3\n\nprint(main())\n", "new/module.py": "x = 1\ny = 2\n"})
    git("add", "-A", cwd=clone)
    git("commit", "-q", "-m", "agent commit", cwd=clone)
    guide = (clone / "docs" / "guide.md").read_text().replace("line 7\n", "line seven\n")
    write(clone, {"docs/guide.md": None, "docs/manual.md": guide, "README.md": None,
                  "data.bin": bytes(range(255, -1, -1)) * 4, "untracked.txt": "not staged\n"})
    changes = await collect(clone, baseline)
    expected_rows, expected_patch = git_view(clone, base)
    assert rows(changes.changes) == expected_rows
    assert {c.status for c in changes.changes} == {"added", "modified", "deleted", "renamed"}
    assert changes.patch == expected_patch
    binary = next(c for c in changes.changes if c.path == "data.bin")
    assert binary.binary and binary.insertions is None
    assert changes.commit == git("rev-parse", "HEAD", cwd=clone).strip() != base
    assert (changes.branch, changes.dirty) == ("trunk", True)
    assert changes.result_git().model_dump() == {"branch": "trunk", "commit": changes.commit, "dirty": True}


async def test_only_the_tasks_changes_and_the_real_index_untouched(clone):
    (clone / "before.txt").write_text("already here before the task\n")
    (clone / "README.md").write_text("edited before the task\n")
    index = clone / ".git" / "index"
    index_before = index.read_bytes()
    baseline = await begin(clone)
    (clone / "during.txt").write_text("the task wrote this\n")
    changes = await collect(clone, baseline)
    assert rows(changes.changes) == [("during.txt", "added", 1, 0, None)]
    assert index.read_bytes() == index_before
    status = git("status", "--porcelain", cwd=clone)
    assert "?? before.txt" in status and "?? during.txt" in status and " M README.md" in status


async def test_clean_after_commit_and_no_changes(clone):
    baseline = await begin(clone)
    changes = await collect(clone, baseline)
    assert (changes.changes, changes.patch, changes.dirty) == ([], "", False)


async def test_patch_is_capped(clone):
    baseline = await begin(clone)
    write(clone, {f"f{i}.txt": "x\n" * 100 for i in range(20)})
    changes = await collect(clone, baseline, max_patch_bytes=2000)
    assert changes.patch_truncated and 0 < len(changes.patch.encode()) <= 2000
    assert len(changes.changes) == 20 and changes.insertions == 2000


@pytest.fixture
def plain_tree(tmp_path) -> Path:
    root = tmp_path / "plain"
    files = {f"pkg{d}/mod{i}.py": f"# module {d}.{i}\nvalue = {i}\n" for d in range(10) for i in range(20)}
    files |= {"notes.txt": "a\nb\nc\n", "keep.txt": "same\n", "old_name.txt": "moved content\n",
              "noeol.txt": "no newline at the end", "blob.bin": b"\x00\x01\x02" * 100}
    write(root, files)
    # A .git directory inside a non-git tree's subfolder is never looked into.
    (root / "vendor" / ".git").mkdir(parents=True)
    (root / "vendor" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


async def test_snapshot_changes_only_list_touched_files(plain_tree, tmp_path):
    pristine = tmp_path / "pristine"
    shutil.copytree(plain_tree, pristine)
    baseline = await begin(plain_tree)
    assert baseline.kind == "snapshot"
    os.utime(plain_tree / "keep.txt", ns=(1, 1))  # touched, content unchanged
    write(plain_tree, {
        "notes.txt": "a\nB\nc\nd\n",
        "pkg3/mod4.py": None,
        "pkg9/new.py": "print('hi')\n",
        "old_name.txt": None,
        "renamed/new_name.txt": "moved content\n",
        "noeol.txt": "still no newline, changed",
        "vendor/.git/HEAD": "changed inside .git\n",
    })
    changes = await collect(plain_tree, baseline)
    assert rows(changes.changes) == [
        ("noeol.txt", "modified", 1, 1, None),
        ("notes.txt", "modified", 2, 1, None),
        ("pkg3/mod4.py", "deleted", 0, 2, None),
        ("pkg9/new.py", "added", 1, 0, None),
        ("renamed/new_name.txt", "renamed", 0, 0, "old_name.txt"),
    ]
    assert changes.result_git() is None
    # The patch reproduces the change on a pristine copy (git apply works outside repositories).
    git("apply", "--whitespace=nowarn", "-", cwd=pristine, input=changes.patch.encode())
    for rel in ("notes.txt", "pkg9/new.py", "renamed/new_name.txt", "noeol.txt"):
        assert (pristine / rel).read_bytes() == (plain_tree / rel).read_bytes()
    assert not (pristine / "pkg3" / "mod4.py").exists() and not (pristine / "old_name.txt").exists()


async def test_snapshot_binary_and_uncaptured_files(plain_tree):
    settings = GitSettings(snapshot_file_limit=1000)
    (plain_tree / "big.txt").write_text("y\n" * 1000)  # 2000 bytes: beyond the content limit
    baseline = await begin(plain_tree, settings=settings)
    (plain_tree / "blob.bin").write_bytes(b"\x00\x09" * 100)
    (plain_tree / "big.txt").write_text("z\n" * 1000)
    changes = {c.path: c for c in (await collect(plain_tree, baseline, settings=settings)).changes}
    assert set(changes) == {"blob.bin", "big.txt"}
    assert changes["blob.bin"].binary and changes["blob.bin"].status == "modified"
    assert changes["big.txt"].status == "modified" and changes["big.txt"].insertions is None


async def test_snapshot_mode_can_be_forced_on_a_git_tree(clone):
    baseline = await begin(clone, mode="snapshot")
    (clone / "src" / "app.py").write_text("changed\n")
    changes = await collect(clone, baseline)
    assert rows(changes.changes) == [("src/app.py", "modified", 1, 2, None)]
