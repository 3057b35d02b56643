"""What the git layer costs on a big workspace: dirty detection and change collection with git vs. a
naive Python walk + hash of the tree, and a fresh clone vs. reusing a clone with a pull.

A bare repository with N small files spread over directories (default 50,000: 100 dirs x 10
subdirs x 50 files) is generated with ``git fast-import`` (seconds, no work tree), cloned through
``bridge.gitops.prepare`` (``file://``, the pack transport), then a few files are modified, added
and deleted. Loopback only; runs in about a minute on 2 cores.

Run: .venv/bin/python bench/workspace.py [--files 50000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ocbridge.bridge.workspace.git import GitSettings, begin, collect, prepare
from ocbridge.bridge.workspace.git.repo import is_dirty
from ocbridge.client.protocol import GitSpec

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = GitSettings(allow_file_urls=True)
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("GIT_")}, "GIT_CONFIG_NOSYSTEM": "1"}


def file_path(i: int) -> str:
    return f"d{i // 500:03d}/s{(i // 50) % 10}/f{i:05d}.txt"


def file_content(i: int, version: int = 0) -> bytes:
    return f"file {i} version {version}\n".encode() + b"some ordinary line of text\n" * (i % 5)


def fast_import(bare: Path, files: int, *, parent: bool, changed: range | None = None) -> None:
    """One commit on ``trunk``: all files (first commit) or only ``changed`` ones (next commit)."""
    if not parent:
        subprocess.run(["git", "init", "-q", "--bare", "-b", "trunk", str(bare)], env=ENV, check=True)
    indices = range(files) if not parent else (changed or range(0))
    chunks: list[bytes] = []
    for mark, i in enumerate(indices, start=1):
        data = file_content(i, version=1 if parent else 0)
        chunks.append(b"blob\nmark :%d\ndata %d\n%s\n" % (mark, len(data), data))
    message = b"update" if parent else b"initial"
    when = 1_700_000_000 + (100 if parent else 0)
    chunks.append(b"commit refs/heads/trunk\ncommitter Bench <bench@example.com> %d +0000\ndata %d\n%s\n"
                  % (when, len(message), message))
    if parent:
        chunks.append(b"from refs/heads/trunk^0\n")
    for mark, i in enumerate(indices, start=1):
        chunks.append(b"M 100644 :%d %s\n" % (mark, file_path(i).encode()))
    chunks.append(b"\n")
    subprocess.run(["git", "fast-import", "--quiet"], cwd=bare, input=b"".join(chunks), env=ENV, check=True)


def naive_hashes(root: Path) -> dict[str, bytes]:
    """What a tool without git would do: walk everything and hash every file."""
    hashes = {}
    for directory, dirs, names in os.walk(root):
        if ".git" in dirs:
            dirs.remove(".git")
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                hashes[os.path.relpath(path, root)] = hashlib.sha1(handle.read()).digest()
    return hashes


def naive_changes(before: dict[str, bytes], after: dict[str, bytes]) -> list[str]:
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


async def timed(label: str, results: dict[str, float], action: Callable[[], Awaitable[Any] | Any],
                repeat: int = 1) -> Any:
    """Time ``action`` (best of ``repeat`` runs for idempotent ones: this machine's disk is noisy)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        value = action()
        if asyncio.iscoroutine(value):
            value = await value
        best = min(best, time.perf_counter() - started)
    results[label] = best
    suffix = f"  (best of {repeat})" if repeat > 1 else ""
    print(f"  {label:<44} {best * 1000:9.1f} ms{suffix}", flush=True)
    return value


async def run(files: int, workdir: Path) -> None:
    t: dict[str, float] = {}
    bare = workdir / "src.git"
    print(f"repository with {files} files")
    await timed("generate (git fast-import)", t, lambda: fast_import(bare, files, parent=False))

    print("clone vs reuse")
    ws = workdir / "ws"
    ws.mkdir()
    url = f"file://{bare}"
    await timed("fresh clone (prepare, file://)", t, lambda: prepare(ws, GitSpec(url=url), settings=SETTINGS))
    fast_import(bare, files, parent=True, changed=range(0, files, max(files // 10, 1)))
    await timed("reuse + pull (10 upstream files changed)", t,
                lambda: prepare(ws, GitSpec(url=url), settings=SETTINGS))
    await timed("reuse + pull (nothing new upstream)", t, lambda: prepare(ws, GitSpec(url=url), settings=SETTINGS))
    await timed("reuse, pull: false", t, lambda: prepare(ws, GitSpec(url=url, pull=False), settings=SETTINGS))

    print("before the prompt (baseline)")
    base_git = await timed("git: begin (work tree -> tree object)", t, lambda: begin(ws, settings=SETTINGS))
    base_snap = await timed("snapshot: begin (stat + content capture)", t,
                            lambda: begin(ws, settings=SETTINGS, mode="snapshot"))
    base_naive = await timed("naive: walk + sha1 every file", t, lambda: naive_hashes(ws))

    # The "agent": 5 files modified, 3 added, 2 deleted.
    for i in range(5):
        (ws / file_path(i * 997 % files)).write_bytes(b"edited by the agent\n")
    for i in range(3):
        (ws / f"d000/new{i}.txt").write_bytes(b"new file\n")
    for i in range(2):
        (ws / file_path(files - 1 - i)).unlink()

    print("after the prompt")
    dirty = await timed("git: dirty? (git status)", t, lambda: is_dirty(ws, settings=SETTINGS), repeat=3)
    naive_after = await timed("naive: dirty? (walk + sha1 every file)", t, lambda: naive_hashes(ws), repeat=3)
    changed_naive = naive_changes(base_naive, naive_after)
    git_set = await timed("git: collect changes + patch", t, lambda: collect(ws, base_git, settings=SETTINGS))
    snap_set = await timed("snapshot: collect changes + patch", t, lambda: collect(ws, base_snap, settings=SETTINGS))
    assert dirty and len(git_set.changes) == len(snap_set.changes) == len(changed_naive) == 10, (
        len(git_set.changes), len(snap_set.changes), len(changed_naive))

    naive_dirty, git_dirty = t["naive: dirty? (walk + sha1 every file)"], t["git: dirty? (git status)"]
    naive_total = t["naive: walk + sha1 every file"] + naive_dirty
    git_total = t["git: begin (work tree -> tree object)"] + t["git: collect changes + patch"]
    snap_total = t["snapshot: begin (stat + content capture)"] + t["snapshot: collect changes + patch"]
    clone, pull = t["fresh clone (prepare, file://)"], t["reuse + pull (10 upstream files changed)"]
    print("\nsummary")
    print(f"  dirty detection: git status {git_dirty * 1000:.0f} ms vs naive walk+hash {naive_dirty * 1000:.0f} ms "
          f"({naive_dirty / git_dirty:.1f}x faster)")
    print(f"  change collection (before + after): git {git_total * 1000:.0f} ms vs naive {naive_total * 1000:.0f} ms "
          f"({naive_total / git_total:.1f}x); non-git snapshot {snap_total * 1000:.0f} ms (with line counts + patch)")
    print(f"  fresh clone {clone * 1000:.0f} ms vs reuse + pull {pull * 1000:.0f} ms ({clone / pull:.1f}x faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="bench-workspace-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(run(args.files, workdir))
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
