"""Process helpers on real, short-lived processes: binary lookup, tree collection, kills, parent death."""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ocbridge.bridge.processes import (
    TOOLS_DIR_VAR,
    BinaryNotFound,
    EnvMarker,
    collect_tree,
    die_with_parent,
    die_with_parent_hook,
    find_binary,
    is_alive,
    kill_group,
    kill_marked,
    process_alive,
    process_of,
    signal_all,
    wait_dead,
)

SH_ENV = {"PATH": "/usr/bin:/bin"}
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sessions and PDEATHSIG: Linux")


def executable(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """``subprocess.Popen`` (not asyncio's, whose watcher would reap the zombies under test) for the
    processes of a test: their groups are killed and they are reaped afterwards, whatever happens."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        procs.append(subprocess.Popen(argv, **kwargs))
        return procs[-1]

    yield start
    for proc in procs:
        kill_group(proc.pid)
        proc.wait(5)


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ------------------------------------------------------------------------------- find_binary


def test_configured_binary_wins_and_is_checked(tmp_path: Path) -> None:
    tool = executable(tmp_path / "bin", "tool")
    assert find_binary("other", str(tool)) == str(tool)
    (tmp_path / "plain").write_text("")
    with pytest.raises(BinaryNotFound, match="is not an executable file"):
        find_binary("tool", str(tmp_path / "plain"))
    assert find_binary("x", "tool", path=str(tmp_path / "bin")) == str(tool)
    with pytest.raises(FileNotFoundError, match="nope not found on PATH: do this"):
        find_binary("x", "nope", path=str(tmp_path), hint="do this")


def test_tools_dir_comes_before_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = executable(tmp_path / "path", "agent")
    assert find_binary("agent", path=str(on_path.parent)) == str(on_path)
    monkeypatch.setenv(TOOLS_DIR_VAR, str(tmp_path / "tools"))
    local = executable(tmp_path / "tools", "agent")
    assert find_binary("agent", path=str(on_path.parent)) == str(local)
    with pytest.raises(BinaryNotFound, match=f"missing not found in {tmp_path / 'tools'}.*: install it"):
        find_binary("missing", path=str(tmp_path), hint="install it")


# ----------------------------------------------------------------------------- process trees


def command(proc: psutil.Process) -> str:
    """A process's command line; empty once it exited meanwhile (the subshell that double-forks
    exits at once: found alive, a zombie a moment later)."""
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def test_tree_spans_sessions_and_the_marker(tmp_path: Path, spawn: Spawn) -> None:
    mark, marker = f"300.{random.randrange(10**8)}", EnvMarker("OCBRIDGE_TEST_MARK")
    # A child in its own session (reached by ppid), and a double-forked one in its own session
    # whose parent exits at once (re-parented away: only the marker finds it).
    script = f"setsid sleep {mark}1 & (setsid sleep {mark}2 &) ; exec sleep {mark}3"
    root = spawn(["sh", "-c", script], env={**SH_ENV, marker.name: marker.value}, start_new_session=True)
    cmdlines = {f"sleep {mark}{i}" for i in (1, 2, 3)}

    def found() -> set[str]:
        return {command(p) for p in collect_tree(process_of(root.pid), marker)} & cmdlines

    assert wait_until(lambda: found() == cmdlines)
    assert {command(p) for p in collect_tree(None, marker)} >= cmdlines
    unmarked = {command(p) for p in collect_tree(process_of(root.pid))} & cmdlines
    assert unmarked == cmdlines - {f"sleep {mark}2"} and not collect_tree(None, EnvMarker(marker.name))

    assert kill_marked(marker) == 3
    root.wait(5)
    assert wait_until(lambda: not collect_tree(None, marker))


async def test_zombies_and_reused_pids_count_as_dead(spawn: Spawn) -> None:
    child = spawn(["true"])
    proc = process_of(child.pid)
    assert proc is not None
    # Exited but not reaped: a zombie, already dead for every helper.
    assert wait_until(lambda: not is_alive(proc))
    assert not process_alive(child.pid) and await wait_dead([proc], 0.1)
    assert collect_tree(proc) == set()
    child.wait()
    assert process_of(child.pid) is None and signal_all([proc], 9) == 0


async def test_signal_all_and_wait_dead(spawn: Spawn) -> None:
    sleeper = spawn(["sleep", "30"], start_new_session=True)
    proc = process_of(sleeper.pid)
    assert proc is not None and is_alive(proc)
    assert not await wait_dead([proc], 0.1)
    assert signal_all([proc], 15) == 1
    assert await wait_dead([proc], 5)


def test_kill_group_reaches_the_group(spawn: Spawn) -> None:
    leader = spawn(["sh", "-c", "sleep 30 & sleep 30; wait"], start_new_session=True)
    assert wait_until(lambda: len(collect_tree(process_of(leader.pid))) == 3)
    members = collect_tree(process_of(leader.pid))
    kill_group(leader.pid)
    leader.wait(5)
    assert wait_until(lambda: not any(is_alive(p) for p in members))
    kill_group(leader.pid)  # a group already gone is ignored


# --------------------------------------------------------------------------- die_with_parent


def test_die_with_parent_hook_runs_and_checks_the_parent() -> None:
    assert subprocess.run(["true"], preexec_fn=die_with_parent_hook(), check=False).returncode == 0
    # A parent pid that is not ours: the child believes its parent already died, and exits.
    assert subprocess.run(["true"], preexec_fn=functools.partial(die_with_parent, os.getpid() + 10**6),
                          check=False).returncode == 1  # fmt: skip
