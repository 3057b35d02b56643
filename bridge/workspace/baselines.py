"""Baselines that outlive the sidecar: a later attempt of a task reports the changes since the
first attempt's start, not since its own.

A task's changes are what differs from the workspace as it was before the prompt (its baseline).
When a run is carried on after the sidecar died (see the OpenCode engine's history resume), or a
task given back runs again, what the earlier attempt's agent did is already on disk: a fresh
baseline would leave it out of the result. So each run keeps its baseline in a small file under
``<data_dir>/baselines`` until the task has its result, and a later attempt on this box starts
from it. Another box's attempt finds none (no shared disk) and takes its own, which is right
there: that box's workspace never saw the earlier attempt.

The files are JSON written by the sidecar itself (never a pickle); a file that cannot be read
is logged and ignored (the attempt takes a fresh baseline). A snapshot holding more than
``KEEP_LIMIT`` of file content (a large non-git workspace) is not kept: its later attempt takes a
fresh baseline. Files older than ``max_age`` (the task records' TTL: no later attempt can come;
left by a task whose later attempt ran on another box) are removed when a baseline is kept, at
most once every ``PRUNE_INTERVAL``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .git.changes import Baseline
from .git.snapshot import Entry, Snapshot

__all__ = ["KEEP_LIMIT", "BaselineStore"]

log = logging.getLogger(__name__)

#: Most compressed file content a kept snapshot may hold (git baselines are two ids).
KEEP_LIMIT = 4 * 2**20

#: Seconds between two looks for files past ``max_age``.
PRUNE_INTERVAL = 3600.0


class BaselineStore:
    """Baselines of the runs in progress, by task message (``"<taskID> <stream seq>"``)."""

    def __init__(self, folder: Path, *, max_age: float) -> None:
        self.folder = folder
        self.max_age = max_age
        self._pruned_at: float | None = None

    def put(self, delivery: str, baseline: Baseline) -> None:
        """Keep ``baseline`` for ``delivery`` (atomically: a crash leaves the old file or the new
        one). Blocking file I/O: small for git, up to ``KEEP_LIMIT`` for a snapshot."""
        if baseline.snapshot is not None and baseline.snapshot.size > KEEP_LIMIT:
            return
        path = self._path(delivery)
        tmp = path.with_suffix(".tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._prune_now_and_then()
            tmp.write_text(json.dumps(_encode(baseline)))
            os.replace(tmp, path)
        except OSError as exc:  # a full disk costs a later attempt its earlier changes, not the run
            log.warning("keeping the baseline of %s failed: %s", delivery.split()[0], exc)

    def get(self, delivery: str, root: Path) -> Baseline | None:
        """The baseline an earlier attempt of ``delivery`` kept for the workspace at ``root``."""
        path = self._path(delivery)
        try:
            data = json.loads(path.read_text())
            baseline = _decode(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("the kept baseline of %s is unreadable (%s); taking a new one", delivery.split()[0], exc)
            return None
        return baseline if baseline.root == root else None

    def discard(self, delivery: str) -> None:
        """The task has its result: no later attempt needs the baseline."""
        try:
            self._path(delivery).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # pruned after max_age anyway
            log.warning("removing the kept baseline of %s failed: %s", delivery.split()[0], exc)

    def _path(self, delivery: str) -> Path:
        return self.folder / (hashlib.sha256(delivery.encode()).hexdigest()[:32] + ".json")

    def _prune_now_and_then(self) -> None:
        now = time.monotonic()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_INTERVAL:
            return
        self._pruned_at = now
        cutoff = time.time() - self.max_age
        for path in self.folder.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()


def _encode(baseline: Baseline) -> dict[str, Any]:
    data: dict[str, Any] = {"kind": baseline.kind, "root": str(baseline.root), "commit": baseline.commit,
                            "tree": baseline.tree}
    if baseline.snapshot is not None:
        snap = baseline.snapshot
        data["snapshot"] = {
            "taken_ns": snap.taken_ns, "size": snap.size,
            "entries": {name: [e.size, e.mtime_ns, e.mode, e.link, _b64(e.data), _b64(e.digest), e.ctime_ns, e.ino]
                        for name, e in snap.entries.items()},
        }
    return data


def _decode(data: dict[str, Any]) -> Baseline:
    snap = None
    if data.get("snapshot") is not None:
        raw = data["snapshot"]
        entries = {
            str(name): Entry(size=int(size), mtime_ns=int(mtime), mode=int(mode), link=link, data=_unb64(blob),
                             digest=_unb64(digest), ctime_ns=int(ctime), ino=int(ino))
            for name, (size, mtime, mode, link, blob, digest, ctime, ino) in raw["entries"].items()
        }
        snap = Snapshot(entries=entries, taken_ns=int(raw["taken_ns"]), size=int(raw["size"]))
    if data["kind"] not in ("git", "snapshot"):
        raise ValueError(f"unknown kind {data['kind']!r}")
    return Baseline(kind=data["kind"], root=Path(data["root"]), commit=data.get("commit"), tree=data.get("tree"),
                    snapshot=snap)


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def _unb64(value: str | None) -> bytes | None:
    return None if value is None else base64.b64decode(value, validate=True)
