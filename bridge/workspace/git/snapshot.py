"""Changes in a workspace that is not a git repository: a before/after snapshot of the tree.

Before the prompt every file's size, mtime and mode are recorded, and the content of files up to
``file_limit`` bytes is kept (compressed, ``budget`` bytes in total) so that afterwards line counts
and a unified diff can be made. The content of a file whose stat data (size, mtime, ctime, inode)
is the same as in the previous snapshot of the same tree is taken from that snapshot instead of
being read again (:class:`SnapshotCache`): a task in a big workspace reads only what changed since
the last one. After the prompt only files whose stat data changed are read again;
a file whose content is unchanged (merely touched) is not reported. Deleted + added files with the
same content are reported as one rename. Directories named ``.git`` are skipped. Synchronous: a
big tree is walked through :func:`asyncio.to_thread`; a small one (:func:`walk_if_small`) is walked
on the caller's thread, and the rest runs there too when little is left to read (:func:`reads_needed`).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import stat
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ocbridge.bridge.agent_user import open_agent_file
from ocbridge.client.protocol import FileChange

_BINARY_PROBE = 8000  # bytes git inspects for a NUL to call a file binary


@dataclass(slots=True)
class Entry:
    size: int
    mtime_ns: int
    mode: int
    #: Target of a symbolic link (links are compared by target, never followed).
    link: str | None = None
    #: zlib-compressed content, when captured.
    data: bytes | None = None
    digest: bytes | None = None
    ctime_ns: int = 0
    ino: int = 0

    def same_file(self, other: Entry) -> bool:
        """Whether the stat data says ``other`` is this file, unchanged."""
        return (self.size, self.mtime_ns, self.ctime_ns, self.ino, self.mode, self.link) == (
            other.size, other.mtime_ns, other.ctime_ns, other.ino, other.mode, other.link)


@dataclass(slots=True)
class Snapshot:
    entries: dict[str, Entry] = field(default_factory=dict)
    #: Wall-clock time the walk started (nanoseconds), for the racy-file rule of the cache.
    taken_ns: int = 0
    #: Bytes of compressed content held.
    size: int = 0


#: A file changed less than this long before a snapshot may change again within the same
#: timestamp tick (file times are coarse): its captured content is not reused by the next snapshot.
_RACY_NS = 2_000_000_000


class SnapshotCache:
    """The last snapshot of recently used trees, at most ``max_bytes`` of compressed content in
    all (least recently used first out). Thread-safe: snapshots are taken in worker threads."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._snapshots: OrderedDict[str, Snapshot] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, root: Path) -> Snapshot | None:
        with self._lock:
            snap = self._snapshots.get(str(root))
            if snap is not None:
                self._snapshots.move_to_end(str(root))
            return snap

    def put(self, root: Path, snap: Snapshot) -> None:
        with self._lock:
            old = self._snapshots.pop(str(root), None)
            if old is not None:
                self._size -= old.size
            if snap.size > self.max_bytes:
                return
            self._snapshots[str(root)] = snap
            self._size += snap.size
            while self._size > self.max_bytes:
                _, evicted = self._snapshots.popitem(last=False)
                self._size -= evicted.size


#: The process-wide cache :func:`take` uses unless given another.
default_cache = SnapshotCache()

#: A tree whose last snapshot had at most this many entries is walked on the event loop (about
#: 1.5 ms here; 1000 entries took 6 ms), and so is the rest of the job when it reads at most ``INLINE_READ_BYTES``:
#: handing so small a job to a worker thread costs more CPU than the job (the hand-off, and the
#: GIL passed back and forth at every stat call while the loop runs other tasks).
INLINE_ENTRIES = 256
INLINE_READ_BYTES = 256 * 1024

#: What a walk yields: ``(relative posix path, os.stat_result, link target)``.
Walked = list[tuple[str, os.stat_result, str | None]]


def walk_if_small(root: Path, previous: Snapshot | None) -> Walked | None:
    """The walk of ``root`` when its ``previous`` snapshot says the tree is small; ``None``
    (nothing walked) when it is big or unknown."""
    if previous is None or len(previous.entries) > INLINE_ENTRIES:
        return None
    walked: Walked = []
    for item in _walk(root):
        if len(walked) == 2 * INLINE_ENTRIES:
            return None  # it grew (an install?): the thread walks it, the loop stops here
        walked.append(item)
    return walked


def reads_needed(walked: Walked, previous: Snapshot, file_limit: int) -> int:
    """Bytes :func:`take` or :func:`compare` would read after ``walked``: the files up to
    ``file_limit`` that are new, changed or changed too recently to be trusted since ``previous``."""
    trusted_before = previous.taken_ns - _RACY_NS
    total = 0
    for rel, st, link in walked:
        if link is not None or st.st_size > file_limit:
            continue
        old = previous.entries.get(rel)
        if (old is None or old.size != st.st_size or old.mtime_ns != st.st_mtime_ns
                or max(old.mtime_ns, old.ctime_ns) >= trusted_before):
            total += st.st_size
    return total


def _walk(root: Path):
    """Yield ``(relative posix path, os.stat_result, link target)`` for files and links under ``root``."""
    stack = [(str(root), "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    if entry.name == ".git":
                        continue
                    rel = prefix + entry.name
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISLNK(st.st_mode):
                        try:
                            yield rel, st, os.readlink(entry.path)
                        except OSError:
                            continue
                    elif stat.S_ISDIR(st.st_mode):
                        stack.append((entry.path, rel + "/"))
                    elif stat.S_ISREG(st.st_mode):
                        yield rel, st, None
        except OSError:
            continue


def _read(path: Path) -> bytes | None:
    # Never through a link: the agent may have swapped the file for one since the walk saw it (the
    # sidecar may read what the agent's user cannot).
    try:
        with open_agent_file(path) as handle:
            return handle.read()
    except OSError:
        return None


def _entry(st: os.stat_result, link: str | None) -> Entry:
    return Entry(size=st.st_size, mtime_ns=st.st_mtime_ns, mode=st.st_mode, link=link,
                 ctime_ns=st.st_ctime_ns, ino=st.st_ino)


def take(root: Path, *, file_limit: int, budget: int, cache: SnapshotCache | None = default_cache,
         walked: Walked | None = None) -> Snapshot:
    """Snapshot the tree under ``root``; content unchanged since ``cache``'s last snapshot of it is
    reused. ``walked``: the tree's walk, made just before (else it is walked here)."""
    previous = cache.get(root) if cache is not None else None
    before = previous.entries if previous is not None else {}
    # Reusable: captured content of files that had not changed for a while when it was taken.
    trusted_before = previous.taken_ns - _RACY_NS if previous is not None else 0
    snap = Snapshot(taken_ns=time.time_ns())
    entries = snap.entries
    kept = 0
    for rel, st, link in walked if walked is not None else _walk(root):
        size = st.st_size
        capture = link is None and size <= file_limit and kept + size <= budget
        old = before.get(rel)
        if (capture and old is not None and old.data is not None and old.link is None
                and old.mtime_ns == st.st_mtime_ns and old.ctime_ns == st.st_ctime_ns and old.size == size
                and old.ino == st.st_ino and old.mode == st.st_mode
                and max(old.mtime_ns, old.ctime_ns) < trusted_before):
            entries[rel] = old  # the same file, unchanged for a while: its entry is reused as it is
            kept += size
            snap.size += len(old.data)
            continue
        entry = _entry(st, link)
        if capture and (content := _read(root / rel)) is not None:
            entry.data = zlib.compress(content, 1)
            entry.digest = hashlib.sha1(content).digest()
            kept += len(content)
            snap.size += len(entry.data)
        entries[rel] = entry
    if cache is not None:
        cache.put(root, snap)
    return snap


def _is_binary(content: bytes) -> bool:
    return b"\0" in content[:_BINARY_PROBE]


def _mode(entry: Entry) -> str:
    if entry.link is not None:
        return "120000"
    return "100755" if entry.mode & 0o111 else "100644"


def _content(entry: Entry) -> bytes | None:
    if entry.link is not None:
        return entry.link.encode()
    return zlib.decompress(entry.data) if entry.data is not None else None


def _lines(content: bytes) -> list[str]:
    # Split on "\n" only, as git does (str.splitlines also splits on \r, \f, \x1c...).
    parts = content.decode("utf-8", "replace").split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _unified(old: bytes, new: bytes, a: str, b: str) -> tuple[str, int, int]:
    """A git-style hunk section for two text contents, and the insertions and deletions it shows."""
    a_lines, b_lines = _lines(old), _lines(new)
    out: list[str] = []
    ins = dels = 0
    for number, line in enumerate(difflib.unified_diff(a_lines, b_lines, a, b, n=3)):
        if number >= 2:  # the first two lines are the ---/+++ headers
            if line.startswith("+"):
                ins += 1
            elif line.startswith("-"):
                dels += 1
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out), ins, dels


class _Patch:
    """Accumulates a patch up to a size limit."""

    def __init__(self, limit: int) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.limit = limit
        self.truncated = False

    def add(self, text: str) -> None:
        if self.truncated:
            return
        size = len(text.encode("utf-8", "replace"))
        if self.size + size > self.limit:
            self.truncated = True
            return
        self.parts.append(text)
        self.size += size


def compare(root: Path, before: Snapshot, *, file_limit: int, max_patch_bytes: int,
            walked: Walked | None = None) -> tuple[list[FileChange], str, bool]:
    """Changes between ``before`` and the tree now: ``(changes, unified diff, diff truncated)``.
    ``walked``: the tree's walk, made just before (else it is walked here)."""
    now: dict[str, Entry] = {}
    unchanged: set[str] = set()  # same size, mtime and link as before: the common case, no Entry made
    previous = before.entries
    for rel, st, link in walked if walked is not None else _walk(root):
        old = previous.get(rel)
        if old is not None and old.link == link and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
            now[rel] = old
            unchanged.add(rel)
        else:
            now[rel] = _entry(st, link)
    changes: dict[str, FileChange] = {}
    patch = _Patch(max_patch_bytes)
    new_content: dict[str, bytes | None] = {}

    def current(rel: str) -> bytes | None:
        if rel not in new_content:
            entry = now[rel]
            if entry.link is not None:
                new_content[rel] = entry.link.encode()
            else:
                new_content[rel] = _read(root / rel) if entry.size <= file_limit else None
        return new_content[rel]

    added = sorted(set(now) - set(before.entries))
    deleted = sorted(set(before.entries) - set(now))
    # Exact renames: a deleted file whose captured content reappears under a new name.
    by_digest: dict[bytes, str] = {}
    for rel in added:
        content = current(rel)
        if content is not None and now[rel].link is None:
            by_digest.setdefault(hashlib.sha1(content).digest(), rel)
    for rel in list(deleted):
        old = before.entries[rel]
        target = by_digest.pop(old.digest, None) if old.digest is not None else None
        if target is not None and target in added:
            added.remove(target)
            deleted.remove(rel)
            changes[target] = FileChange(path=target, status="renamed", old_path=rel, insertions=0, deletions=0)
            patch.add(f"diff --git a/{rel} b/{target}\nsimilarity index 100%\nrename from {rel}\nrename to {target}\n")

    for rel in sorted(set(now) & set(before.entries) - unchanged):
        old, new = before.entries[rel], now[rel]
        old_bytes, new_bytes = _content(old), current(rel)
        if old_bytes is not None and old_bytes == new_bytes:
            continue  # touched, not changed
        _record(changes, patch, rel, "modified", old_bytes, new_bytes, _mode(old), _mode(new))
    for rel in added:
        _record(changes, patch, rel, "added", b"", current(rel), None, _mode(now[rel]))
    for rel in deleted:
        entry = before.entries[rel]
        _record(changes, patch, rel, "deleted", _content(entry), b"", _mode(entry), None)
    return sorted(changes.values(), key=lambda c: c.path), "".join(patch.parts), patch.truncated


def _record(changes: dict[str, FileChange], patch: _Patch, rel: str, status: str, old: bytes | None,
            new: bytes | None, old_mode: str | None, new_mode: str | None) -> None:
    header = f"diff --git a/{rel} b/{rel}\n"
    if status == "added":
        header += f"new file mode {new_mode}\n"
    elif status == "deleted":
        header += f"deleted file mode {old_mode}\n"
    elif old_mode != new_mode:
        header += f"old mode {old_mode}\nnew mode {new_mode}\n"
    if old is None or new is None:
        # Content not captured (too large, or beyond the snapshot budget): listed without counts.
        changes[rel] = FileChange(path=rel, status=status)
        patch.add(header + "(content not captured: file too large)\n")
        return
    if _is_binary(old) or _is_binary(new):
        changes[rel] = FileChange(path=rel, status=status, binary=True)
        a = "/dev/null" if status == "added" else f"a/{rel}"
        b = "/dev/null" if status == "deleted" else f"b/{rel}"
        patch.add(header + f"Binary files {a} and {b} differ\n")
        return
    a = "/dev/null" if status == "added" else f"a/{rel}"
    b = "/dev/null" if status == "deleted" else f"b/{rel}"
    body, ins, dels = _unified(old, new, a, b)
    changes[rel] = FileChange(path=rel, status=status, insertions=ins, deletions=dels)
    patch.add(header + body)
