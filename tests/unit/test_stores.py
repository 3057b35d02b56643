"""The folder stores of the in-process backends and the janitor's workspace records, on real files:
concurrent writers, symlinks in the store, records written by someone else."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import pytest

from ocbridge.bridge.storage.stores import FolderArtifacts, FolderKeyValue
from ocbridge.bridge.workspace.janitor import WorkspaceJanitor
from ocbridge.bridge.workspace.paths import open_workspace

PREFIX = "ocbridge.workspace."


async def test_concurrent_puts_of_one_key_never_race(tmp_path):
    kv = FolderKeyValue(tmp_path / "kv")
    values = [json.dumps({"n": n, "pad": "x" * 4096}).encode() for n in range(200)]
    await asyncio.gather(*(kv.put("sessions/one key", value) for value in values))
    assert await kv.get("sessions/one key") in values
    assert await kv.keys() == ["sessions/one key"]
    assert sorted(p.name for p in (tmp_path / "kv").iterdir()) == ["sessions%2Fone%20key.json"]  # no temporary left


async def test_folder_artifacts_refuse_names_and_links_leading_out_of_the_store(tmp_path):
    store_dir, outside = tmp_path / "files", tmp_path / "outside"
    store_dir.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"keep me")
    store = FolderArtifacts(store_dir)
    os.symlink(outside, store_dir / "input")
    for name in ("input/t1/x", "input/secret", "../outside/secret", "/etc/passwd", "", "a\x00b"):
        with pytest.raises(ValueError):
            await store.put(name, b"pwned")
        with pytest.raises(ValueError):
            await store.get(name)
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"keep me"
    (store_dir / "real").mkdir()
    os.symlink(store_dir / "real", store_dir / "alias")  # a link that stays inside is fine
    await store.put("alias/t1/changes.patch", b"diff")
    assert await store.get("real/t1/changes.patch") == b"diff"
    assert await store.get("real/missing") is None


@pytest.fixture
def janitor_setup(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep me\n")
    kv = FolderKeyValue(tmp_path / "state")
    return WorkspaceJanitor(kv, root), kv, root, outside


async def test_a_record_with_a_foreign_key_is_read_not_fatal(janitor_setup):
    janitor, kv, root, _ = janitor_setup
    ws = open_workspace(root, "ws").path
    await kv.put(PREFIX + str(ws), json.dumps({
        "path": str(ws), "policy": "on_success", "scope": "agent", "last_used": time.time(),
        "owner": "station", "labels": {"team": "a"},  # keys this sidecar does not know
    }).encode())
    record = await janitor.record(ws)
    assert record is not None and record.policy == "on_success"
    touched = await janitor.touch(ws)
    assert touched.policy == "on_success"
    assert "owner" not in json.loads(await kv.get(PREFIX + str(ws)))
    assert await janitor.after_task(ws, completed=True) is True
    assert not ws.exists() and await kv.get(PREFIX + str(ws)) is None


async def test_an_unreadable_record_counts_as_absent_and_is_logged(janitor_setup, caplog):
    janitor, kv, root, _ = janitor_setup
    ws = open_workspace(root, "ws").path
    await kv.put(PREFIX + str(ws), json.dumps({"path": str(ws), "policy": 42}).encode())
    with caplog.at_level(logging.WARNING):
        assert await janitor.record(ws) is None
    assert "unreadable workspace record" in caplog.text and "policy" in caplog.text
    record = await janitor.touch(ws, policy="manual")  # overwritten at the next use
    assert (await janitor.record(ws)) == record


class CountingKeyValue(FolderKeyValue):
    """A folder store that counts the requests made to it."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.gets = self.puts = 0

    async def get(self, key):
        self.gets += 1
        return await super().get(key)

    async def put(self, key, value):
        self.puts += 1
        await super().put(key, value)


async def test_a_workspace_used_again_soon_is_not_written_again_unless_its_policy_changes(tmp_path):
    kv = CountingKeyValue(tmp_path / "state")
    janitor = WorkspaceJanitor(kv, tmp_path, touch_interval=0.3)
    ws = open_workspace(tmp_path, "ws").path
    first = await janitor.touch(ws, policy="on_success")
    for _ in range(5):  # tasks one after another in the same workspace
        assert (await janitor.touch(ws)).policy == "on_success"
        assert await janitor.after_task(ws, completed=False) is False
    assert (kv.gets, kv.puts) == (1, 1)
    await janitor.touch(ws, policy="manual")  # a new policy is written at once
    assert kv.puts == 2 and (await janitor.record(ws)).policy == "manual"
    await asyncio.sleep(0.35)
    await janitor.touch(ws)  # and last_used again once the interval is over
    stored = await janitor.record(ws)
    assert kv.puts == 3 and stored.policy == "manual" and stored.last_used > first.last_used + 0.3
    assert await janitor.delete(ws)
    await janitor.touch(ws)  # deleted: nothing remembered, the record is made again
    assert kv.puts == 4 and (await janitor.record(ws)).policy == "manual"


async def test_the_sweeper_never_deletes_outside_the_root(janitor_setup):
    janitor, kv, root, outside = janitor_setup
    old = time.time() - 7200
    os.symlink(outside, root / "escape")
    inside = open_workspace(root, "old-ws").path
    foreign = {
        str(outside): {"path": str(outside)},  # a record naming a folder outside the root
        str(root / "escape"): {"path": str(root / "escape")},  # a link under the root leading out
        "relative/ws": {"path": "relative/ws"},
        # the key names the workspace; a record's own ``path`` pointing elsewhere is not followed
        str(inside): {"path": str(outside)},
    }
    for key, data in foreign.items():
        await kv.put(PREFIX + key, json.dumps({**data, "last_used": old, "extra": True}).encode())
    removed = await janitor.sweep(max_age=60)
    assert removed == [str(inside)] and not inside.exists()
    assert (outside / "keep.txt").read_text() == "keep me\n" and (root / "escape").is_symlink()
    assert await janitor.delete(root) is False
