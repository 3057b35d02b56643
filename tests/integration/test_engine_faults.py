"""Engine faults that are not the task's fault, on the real OpenCode (HTTP and ``opencode run``) and
the offline model: the engine raises :class:`EngineUnavailable` (the worker gives the task back and
tries it later) instead of producing an error result, says so in ``healthy()``, and serves again.

OpenCode's database lock is produced for real: the test holds a write transaction on OpenCode's own
SQLite store (``$XDG_DATA_HOME/opencode/opencode.db``), as a concurrent OpenCode process would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ocbridge.bridge.engines.base import AgentEvent, EngineUnavailable, PromptRequest
from ocbridge.bridge.engines.cli import OpenCodeCLIEngine, OpenCodeCLISettings
from ocbridge.bridge.engines.opencode import OpenCodeEngine, OpenCodeSettings
from ocbridge.bridge.offline_model.configs import opencode_provider_config
from ocbridge.bridge.offline_model.server import OfflineModelServer

ROOT = Path(__file__).resolve().parents[2]
OPENCODE = ROOT / ".tools/npm/node_modules/.bin/opencode"
VENV_BIN = str(ROOT / ".venv/bin")

pytestmark = pytest.mark.opencode


class Recorder:
    def __init__(self) -> None:
        self.events: list[AgentEvent] = []

    async def __call__(self, event: AgentEvent) -> None:
        self.events.append(event)


def processes_with(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


async def wait_until(predicate: Callable[[], Any], timeout: float) -> bool:
    """Poll a state the test does not own (a process, a supervisor) until it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


def sleep_marker() -> str:
    """A unique ``sleep`` command line, to find the tool's process in /proc and nobody else's."""
    return f"sleep 2.{random.randrange(10**8, 10**9)}"


@contextlib.contextmanager
def store_locked(state_dir: Path) -> Iterator[None]:
    """Hold the write lock of OpenCode's SQLite store, like a busy concurrent OpenCode process."""
    db = sqlite3.connect(state_dir / "data" / "opencode" / "opencode.db", isolation_level=None, timeout=0)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


@pytest.fixture(scope="module")
async def model_url() -> AsyncIterator[str]:
    if not OPENCODE.exists():
        pytest.fail("opencode is not installed: run scripts/setup")
    async with OfflineModelServer() as server:
        assert server.url is not None
        yield server.url


def http_settings(model_url: str, state: Path, **overrides: Any) -> OpenCodeSettings:
    values: dict[str, Any] = {
        "binary": str(OPENCODE),
        "state_dir": state,
        "config": opencode_provider_config(model_url),
        "extra_path": [VENV_BIN],
        "restart_backoff": 0.2,
        "status_poll_interval": 1.0,
    }
    values.update(overrides)
    return OpenCodeSettings(**values)


def cli_settings(model_url: str, state: Path, **overrides: Any) -> OpenCodeCLISettings:
    values: dict[str, Any] = {
        "binary": str(OPENCODE),
        "state_dir": state,
        "config": opencode_provider_config(model_url),
        "extra_path": [VENV_BIN],
    }
    values.update(overrides)
    return OpenCodeCLISettings(**values)


def workspace(tmp_path: Path, name: str = "ws") -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


# --- OpenCode over HTTP -------------------------------------------------------------------------------


async def test_opencode_killed_mid_task_carries_on_with_the_restarted_server(model_url: str, tmp_path: Path) -> None:
    """OpenCode dies in the middle of a task; once the supervisor has it back, the same run carries
    on from the session's history (the same user message sent again): no give-back, no second prompt,
    the interrupted command reported as such and run again, the rest of the task done."""
    mark = sleep_marker()
    prompt = f"run {mark}\ncreate done.txt with content done"
    async with OpenCodeEngine(http_settings(model_url, tmp_path / "state")) as engine:
        assert engine.process is not None and engine.healthy()
        ws = workspace(tmp_path)
        handle = await engine.open_session(ws, "killed", None)
        rec = Recorder()
        task = asyncio.create_task(engine.run(PromptRequest(ws, handle.id, prompt), rec))
        assert await wait_until(lambda: processes_with(mark), 30), "the tool command never started"
        in_flight = processes_with(mark)
        assert engine.process.pid is not None
        os.kill(engine.process.pid, signal.SIGKILL)
        assert await wait_until(lambda: not engine.healthy(), 5)
        assert await wait_until(lambda: not set(in_flight) & set(processes_with(mark)), 5), (
            "the killed server's tool command survived")

        outcome = await asyncio.wait_for(task, 60)
        assert outcome.error is None and (ws / "done.txt").read_text() == "done" and engine.healthy()
        # The model saw the cut-off command as interrupted and ran it again: three tool calls for
        # two steps, and the summary shows the run that came through.
        assert outcome.text.count(f"Ran `{mark}`") == 1 and "interrupted" not in outcome.text
        assert outcome.tool_calls == 3, outcome
        assert outcome.message_count == 1  # one prompt in the history: carried on, not sent again as new
        assert [e.tool.name for e in rec.events if e.kind == "tool_start"][-1] == "write"
        await engine.release(ws)
    assert processes_with(mark) == []


async def test_opencode_down_is_unavailable_not_an_error(model_url: str, tmp_path: Path) -> None:
    """A server that stays down (its restart is far off): calls fail fast as "unavailable"."""
    settings = http_settings(model_url, tmp_path / "state", restart_backoff=300.0)
    async with OpenCodeEngine(settings) as engine:
        assert engine.process is not None and engine.process.pid is not None
        ws = workspace(tmp_path)
        handle = await engine.open_session(ws, "down", None)
        await engine.release(ws)
        settings.startup_timeout = 1.0  # how long a call waits for the server to come back
        os.kill(engine.process.pid, signal.SIGKILL)
        assert await wait_until(lambda: not engine.healthy(), 10)
        for call in (
            engine.open_session(ws, "down", handle.id),
            engine.run(PromptRequest(ws, handle.id, "hello"), Recorder()),
        ):
            with pytest.raises(EngineUnavailable, match="not reachable") as caught:
                await asyncio.wait_for(call, 10)
            assert caught.value.retry_after > 0
        assert not engine.healthy() and not engine.directories.in_use(str(ws))


async def test_opencode_database_locked_is_unavailable_then_serves(model_url: str, tmp_path: Path) -> None:
    async with OpenCodeEngine(http_settings(model_url, tmp_path / "state")) as engine:
        assert engine.process is not None and engine.process.state_dir is not None
        ws = workspace(tmp_path)
        handle = await engine.open_session(ws, "locked", None)
        with store_locked(engine.process.state_dir):
            # OpenCode waits its 5 s busy timeout, then answers 500 "Unexpected server error": the
            # cause it logged says why.
            with pytest.raises(EngineUnavailable, match="database is locked"):
                await asyncio.wait_for(engine.open_session(ws, "second", None), 20)
            # A prompt: OpenCode reports "effect/sql/SqlError" as the session's error.
            with pytest.raises(EngineUnavailable, match="SqlError"):
                await asyncio.wait_for(engine.run(PromptRequest(ws, handle.id, "hello"), Recorder()), 20)
        assert engine.healthy()  # the server itself was fine all along
        outcome = await asyncio.wait_for(engine.run(PromptRequest(ws, handle.id, "hello"), Recorder()), 30)
        assert outcome.error is None and outcome.text == "OK: hello" and outcome.message_count == 1
        await engine.release(ws)


# --- OpenCode CLI (`opencode run`) ----------------------------------------------------------------------


async def test_opencode_cli_locked_store_is_retried_then_given_back(model_url: str, tmp_path: Path) -> None:
    settings = cli_settings(model_url, tmp_path / "state", retry_attempts=1, retry_backoff=0.2)
    async with OpenCodeCLIEngine(settings) as engine:
        ws = workspace(tmp_path)
        request = PromptRequest(ws, "", "create a.txt with content a")
        with store_locked(engine.state_dir):
            # Every attempt fails before the run starts: after the last one the task is given back.
            with pytest.raises(EngineUnavailable, match="database") as caught:
                await asyncio.wait_for(engine.run(request, Recorder()), 60)
            assert caught.value.retry_after > 0 and engine.running == 0 and not (ws / "a.txt").exists()
            # With attempts left, the engine starts the run again once the store is free.
            settings.retry_attempts = 20
            task = asyncio.create_task(engine.run(request, Recorder()))
            assert await wait_until(lambda: engine.retries >= 1, 60), "no failed attempt while locked"
        outcome = await asyncio.wait_for(task, 60)
        assert outcome.error is None and (ws / "a.txt").read_text() == "a"
        assert [s["id"] for s in await engine.list_sessions(ws)] == [outcome.session_id]  # no stray session


async def test_opencode_cli_killed_by_a_signal_is_given_back(model_url: str, tmp_path: Path) -> None:
    """``opencode run`` dying mid-run (the OOM killer, an operator) is not the task's fault."""
    mark = sleep_marker()
    async with OpenCodeCLIEngine(cli_settings(model_url, tmp_path / "state")) as engine:
        ws = workspace(tmp_path)
        task = asyncio.create_task(engine.run(PromptRequest(ws, "", f"run {mark}"), Recorder()))
        assert await wait_until(lambda: processes_with(mark), 60), "the tool command never started"
        (run,) = engine._runs
        assert run.proc.pid is not None
        os.kill(run.proc.pid, signal.SIGKILL)
        with pytest.raises(EngineUnavailable, match="signal 9") as caught:
            await asyncio.wait_for(task, 15)
        assert caught.value.retry_after > 0 and engine.running == 0 and engine.retries == 0  # it had started
        assert processes_with(mark) == []  # its tool command was swept too
        assert engine.healthy()


async def test_cli_binary_gone_is_unhealthy_and_unavailable(model_url: str, tmp_path: Path) -> None:
    link = tmp_path / "bin" / "opencode"
    link.parent.mkdir()
    link.symlink_to(OPENCODE.resolve())
    async with OpenCodeCLIEngine(cli_settings(model_url, tmp_path / "state", binary=str(link))) as engine:
        assert engine.healthy()
        link.unlink()  # an upgrade in progress, a broken volume...
        assert not engine.healthy()
        ws = workspace(tmp_path)
        with pytest.raises(EngineUnavailable, match="binary missing"):
            await engine.run(PromptRequest(ws, "", "hello"), Recorder())
        assert engine.running == 0
