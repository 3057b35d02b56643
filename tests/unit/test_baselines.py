"""Kept baselines (``bridge/workspace/baselines.py``): what a later attempt of a task starts from."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

from ocbridge.bridge.workspace.baselines import KEEP_LIMIT, BaselineStore
from ocbridge.bridge.workspace.git.changes import Baseline, begin, collect, still_comparable
from ocbridge.bridge.workspace.git.runner import run_git
from ocbridge.bridge.workspace.git.settings import GitSettings
from ocbridge.bridge.workspace.git.snapshot import Entry, Snapshot


async def test_a_snapshot_kept_by_one_attempt_gives_the_next_the_first_attempts_changes(tmp_path):
    """The first attempt's baseline, read back from its file by a new store (a restarted
    sidecar), still shows a file the first attempt wrote as added, content and all."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "old.txt").write_text("old\n")
    store = BaselineStore(tmp_path / "baselines", max_age=3600)
    store.put("t-1 5", await begin(workspace, mode="snapshot"))
    (workspace / "new.txt").write_text("new\n")  # the first attempt's agent wrote it, then died
    (workspace / "old.txt").write_text("changed\n")

    kept = BaselineStore(tmp_path / "baselines", max_age=3600).get("t-1 5", workspace)
    assert kept is not None and kept.kind == "snapshot"
    changes = await collect(workspace, kept)
    assert sorted((c.path, c.status) for c in changes.changes) == [("new.txt", "added"), ("old.txt", "modified")]
    assert "-old\n+changed" in changes.patch


def test_a_git_baseline_round_trips_and_belongs_to_one_workspace_and_one_task_message(tmp_path):
    store = BaselineStore(tmp_path / "b", max_age=3600)
    baseline = Baseline(kind="git", root=tmp_path / "ws", commit="a" * 40, tree="b" * 40)
    store.put("t-1 5", baseline)
    assert store.get("t-1 5", tmp_path / "ws") == baseline
    assert store.get("t-1 5", tmp_path / "elsewhere") is None  # another workspace
    assert store.get("t-1 6", tmp_path / "ws") is None  # another publish of the task id
    store.discard("t-1 5")
    assert store.get("t-1 5", tmp_path / "ws") is None
    store.discard("t-1 5")  # twice is fine


def test_an_unreadable_file_is_logged_and_ignored(tmp_path, caplog):
    store = BaselineStore(tmp_path / "b", max_age=3600)
    store.put("t-1 5", Baseline(kind="git", root=tmp_path, commit=None, tree="c" * 40))
    [path] = (tmp_path / "b").iterdir()
    path.write_text('{"kind": "git", "root": ')
    with caplog.at_level(logging.WARNING):
        assert store.get("t-1 5", tmp_path) is None
    assert "unreadable" in caplog.text and "t-1" in caplog.text


def test_old_files_are_pruned_and_large_snapshots_not_kept(tmp_path):
    folder = tmp_path / "b"
    folder.mkdir()
    stale = folder / "stale.json"
    stale.write_text("{}")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    store = BaselineStore(folder, max_age=3600)
    big = Snapshot(entries={"a": Entry(size=1, mtime_ns=1, mode=0o100644, data=b"x")}, size=KEEP_LIMIT + 1)
    store.put("t-1 5", Baseline(kind="snapshot", root=tmp_path, snapshot=big))
    assert store.get("t-1 5", tmp_path) is None
    store.put("t-2 6", Baseline(kind="git", root=tmp_path, tree="d" * 40))
    assert not stale.exists() and store.get("t-2 6", tmp_path) is not None
    assert sorted(p.suffix for p in Path(folder).iterdir()) == [".json"]


async def test_a_kept_git_baseline_is_used_only_while_its_repository_still_has_its_tree(tmp_path):
    """A workspace removed and cloned again between two attempts has no longer the tree the first
    attempt recorded: that baseline cannot be compared, the attempt takes a new one."""
    workspace = tmp_path / "repo"
    workspace.mkdir()
    await run_git(["init", "-q"], workspace, settings=GitSettings())
    (workspace / "a.txt").write_text("a\n")
    kept = await begin(workspace)
    assert kept.kind == "git" and await still_comparable(workspace, kept)
    assert not await still_comparable(workspace, dataclasses.replace(kept, tree="0" * 40))
    shutil.rmtree(workspace / ".git")
    assert not await still_comparable(workspace, kept)  # not a repository any more
    assert await still_comparable(workspace, Baseline(kind="snapshot", root=workspace, snapshot=Snapshot()))
