"""Snapshots of non-git workspaces reuse the content of files that did not change since the last one."""

from __future__ import annotations

import os
import time

from ocbridge.bridge.workspace.git import snapshot

LIMITS = {"file_limit": 1 << 20, "budget": 1 << 24}


def _age(path, seconds: float = 10.0) -> None:
    """Make ``path`` look old (outside the racy window) without changing its content."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def _reads(monkeypatch) -> list[str]:
    read: list[str] = []
    real = snapshot._read

    def counting(path):
        read.append(path.name)
        return real(path)

    monkeypatch.setattr(snapshot, "_read", counting)
    return read


def test_unchanged_files_are_not_read_again(tmp_path, monkeypatch):
    # ctime cannot be set back, so the racy window is measured against it: wait it out cheaply by
    # shrinking the window for this test.
    monkeypatch.setattr(snapshot, "_RACY_NS", 0)
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text("beta\n")
    cache = snapshot.SnapshotCache()
    snapshot.take(tmp_path, cache=cache, **LIMITS)
    read = _reads(monkeypatch)
    (tmp_path / "b.txt").write_text("BETA\n")
    second = snapshot.take(tmp_path, cache=cache, **LIMITS)
    assert read == ["b.txt"]
    changes, patch, _ = snapshot.compare(tmp_path, second, file_limit=LIMITS["file_limit"], max_patch_bytes=1 << 20)
    assert changes == []  # the second snapshot holds b.txt's new content
    (tmp_path / "a.txt").write_text("ALPHA\n")
    changes, patch, _ = snapshot.compare(tmp_path, second, file_limit=LIMITS["file_limit"], max_patch_bytes=1 << 20)
    assert [(c.path, c.status) for c in changes] == [("a.txt", "modified")]
    assert "-alpha\n+ALPHA\n" in patch  # the reused content is the real old content


def test_a_file_changed_within_the_racy_window_is_read_again(tmp_path, monkeypatch):
    path = tmp_path / "same-size.txt"
    path.write_text("one\n")
    cache = snapshot.SnapshotCache()
    snapshot.take(tmp_path, cache=cache, **LIMITS)
    # Rewritten with the same size and (forced) the same mtime: only ctime or the racy rule tells.
    stat = path.stat()
    path.write_text("two\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    read = _reads(monkeypatch)
    snap = snapshot.take(tmp_path, cache=cache, **LIMITS)
    assert read == ["same-size.txt"]
    assert snapshot._content(snap.entries["same-size.txt"]) == b"two\n"


def test_the_cache_keeps_at_most_its_byte_budget(tmp_path):
    cache = snapshot.SnapshotCache(max_bytes=200)
    roots = []
    for number in range(3):
        root = tmp_path / f"ws{number}"
        root.mkdir()
        (root / "data.bin").write_bytes(os.urandom(120))  # incompressible: ~120 bytes kept each
        _age(root / "data.bin")
        snapshot.take(root, cache=cache, **LIMITS)
        roots.append(root)
    assert cache.get(roots[0]) is None and cache.get(roots[1]) is None  # least recently used went first
    assert cache.get(roots[2]) is not None


def test_a_small_tree_is_walked_inline_and_a_big_or_unknown_one_is_left_to_a_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot, "INLINE_ENTRIES", 4)
    for number in range(3):
        (tmp_path / f"f{number}.txt").write_text(f"{number}\n")
    assert snapshot.walk_if_small(tmp_path, None) is None  # never seen: its size is unknown
    cache = snapshot.SnapshotCache()
    first = snapshot.take(tmp_path, cache=cache, **LIMITS)
    walked = snapshot.walk_if_small(tmp_path, first)
    assert walked is not None and sorted(rel for rel, _, _ in walked) == ["f0.txt", "f1.txt", "f2.txt"]
    for number in range(3, 12):  # grew past twice the limit since: walked, but handed on
        (tmp_path / f"f{number}.txt").write_text(f"{number}\n")
    assert snapshot.walk_if_small(tmp_path, first) is None
    bigger = snapshot.take(tmp_path, cache=cache, **LIMITS)
    assert snapshot.walk_if_small(tmp_path, bigger) is None  # its last snapshot is too big


def test_reads_needed_counts_what_is_new_changed_or_too_recent(tmp_path, monkeypatch):
    old, fresh = tmp_path / "old.txt", tmp_path / "fresh.txt"
    old.write_text("old\n")
    fresh.write_text("fresh\n")
    _age(old)
    (tmp_path / "huge.bin").write_bytes(b"x" * 4096)  # over file_limit: never read
    cache = snapshot.SnapshotCache()
    previous = snapshot.take(tmp_path, cache=cache, file_limit=1024, budget=1 << 20)
    monkeypatch.setattr(snapshot, "_RACY_NS", 0)
    walked = snapshot.walk_if_small(tmp_path, previous)
    assert walked is not None
    assert snapshot.reads_needed(walked, previous, 1024) == 0  # all known and trusted now
    (tmp_path / "new.txt").write_text("a new file\n")
    walked = snapshot.walk_if_small(tmp_path, previous)
    assert walked is not None and snapshot.reads_needed(walked, previous, 1024) == len("a new file\n")


def test_a_prewalked_tree_gives_the_same_snapshot_and_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot, "_RACY_NS", 0)
    (tmp_path / "a.txt").write_text("alpha\n")
    cache = snapshot.SnapshotCache()
    before = snapshot.take(tmp_path, cache=cache, **LIMITS)
    (tmp_path / "a.txt").write_text("ALPHA\n")
    (tmp_path / "b.txt").write_text("beta\n")
    walked = snapshot.walk_if_small(tmp_path, before)
    assert walked is not None
    inline = snapshot.compare(tmp_path, before, file_limit=LIMITS["file_limit"], max_patch_bytes=1 << 20,
                              walked=walked)
    walking = snapshot.compare(tmp_path, before, file_limit=LIMITS["file_limit"], max_patch_bytes=1 << 20)
    assert inline == walking
    assert [(c.path, c.status) for c in inline[0]] == [("a.txt", "modified"), ("b.txt", "added")]
    after = snapshot.take(tmp_path, cache=cache, walked=snapshot.walk_if_small(tmp_path, before), **LIMITS)
    assert sorted(after.entries) == ["a.txt", "b.txt"]
    assert snapshot._content(after.entries["b.txt"]) == b"beta\n"
