"""What the engines accept from the wire, how they bound their memory, and how they classify failures.

Pure or on short-lived local processes (no agent CLI, no OpenCode): names and ids that would become
argv items or URL path segments, the bounded per-run event queues and SSE events, the stdout line
cap, and which CLI failures are the task's fault.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from pathlib import Path

import pytest

from ocbridge.bridge.engines.base import EngineError, EngineUnavailable
from ocbridge.bridge.engines.cli import OpenCodeCLIEngine, OpenCodeCLISettings
from ocbridge.bridge.engines.cli.claudecode import ClaudeTranslator
from ocbridge.bridge.engines.cli.common import plain_text
from ocbridge.bridge.engines.cli.opencode_cli import OpenCodeTranslator
from ocbridge.bridge.engines.cli.process import CLIProcess
from ocbridge.bridge.engines.names import check_name, check_opencode_session, check_uuid
from ocbridge.bridge.engines.opencode.api import STORE_BUSY, session_path
from ocbridge.bridge.engines.opencode.events import GAP, SERVER_LOST, Event, SSEParser, Subscription
from ocbridge.bridge.engines.opencode.translate import RunTranslator

SH_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


# --- names and ids from the wire ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["offline/scripted", "anthropic/claude-3.5-sonnet@2024:v1", "build", "a_b.c"])
def test_plain_names_pass(value: str) -> None:
    assert check_name(value, "model") == value


@pytest.mark.parametrize("value", ["-x", "--help", "--model=evil", "a b", "a\nb", "", "x;rm", "é", "a" * 201])
def test_names_that_could_be_options_or_worse_are_invalid_tasks(value: str) -> None:
    with pytest.raises(EngineError) as caught:
        check_name(value, "agent")
    assert caught.value.error_type == "invalid_task" and "agent" in caught.value.message


def test_session_ids() -> None:
    assert check_opencode_session("ses_dcab3fca5ffe5JVYzUjgBPKFKz") == "ses_dcab3fca5ffe5JVYzUjgBPKFKz"
    sid = str(uuid.uuid4())
    assert check_uuid(sid) == sid
    for bad in ("", "ses_", "ses_a/b", "../../global/health", "ses_1?directory=/etc", "ses_1#x", "-ses_1", "ses_1 "):
        with pytest.raises(EngineError) as caught:
            check_opencode_session(bad)
        assert caught.value.error_type == "invalid_task"
    for bad in ("--resume", sid.replace("-", ""), sid + "x", "ses_abc"):
        with pytest.raises(EngineError, match="UUID"):
            check_uuid(bad)


def test_session_ids_never_change_the_url_path() -> None:
    assert session_path("ses_abc123", "/message") == "/session/ses_abc123/message"
    for bad in ("../global/health", "ses_x/../../config", "ses_x%2F..", "ses_x?directory=/"):
        with pytest.raises(EngineError) as caught:
            session_path(bad, "/abort")
        assert caught.value.error_type == "invalid_task"


def test_titles_fit_one_argv_item() -> None:
    assert plain_text("--help\x00me\nplease") == "--help me please"
    assert len(plain_text("t" * 1000)) == 200


# --- bounded memory ---------------------------------------------------------------------------------


def event(n: int, size: int = 10) -> Event:
    return Event("/ws", {"type": "message.part.delta", "properties": {"sessionID": "ses_1", "n": n}}, size)


async def test_a_slow_run_loses_events_not_memory(caplog: pytest.LogCaptureFixture) -> None:
    sub = Subscription("ses_1", "/ws", max_events=3, max_bytes=1000)
    with caplog.at_level(logging.WARNING):
        for n in range(6):
            sub.put(event(n))  # never blocks: the single SSE reader must not wait for one run
    assert len(sub) == 4 and sub.dropped == 3  # three events, then one GAP for all dropped ones
    assert "dropped 1 event" in caplog.text and "session history" in caplog.text
    got = [await sub.get(0.1) for _ in range(4)]
    assert [e.properties["n"] for e in got[:3]] == [0, 1, 2] and got[3] == GAP
    assert await sub.get(0.01) is None  # empty: times out
    sub.put(event(7, size=600))
    sub.put(event(8, size=600))  # over max_bytes
    assert (await sub.get(0.1)).properties["n"] == 7 and await sub.get(0.1) == GAP
    sub.put(SERVER_LOST)
    sub.put(SERVER_LOST)  # repeated markers are coalesced
    assert len(sub) == 1


async def test_get_wakes_up_when_an_item_arrives() -> None:
    sub = Subscription("ses_1", "/ws")
    waiter = asyncio.create_task(sub.get(5))
    await asyncio.sleep(0)
    sub.put(GAP)
    assert await asyncio.wait_for(waiter, 1) == GAP


def test_sse_events_over_the_limit_are_dropped_and_counted() -> None:
    parser = SSEParser(max_event=1000)
    big = json.dumps({"payload": {"type": "t", "properties": {"s": "x" * 5000}}})
    stream = f"data: {big}\n\ndata: small\n\ndata: {'y' * 600}\ndata: {'z' * 600}\n\ndata: last\n\n".encode()
    got: list[str] = []
    for i in range(0, len(stream), 256):  # a long line arrives in pieces: never buffered whole
        got += parser.feed(stream[i : i + 256])
        assert len(parser._buffer) <= 1000 + 256
    assert got == ["small", "last"] and parser.dropped == 2


def test_a_lossy_run_has_no_stream_outcome() -> None:
    tr = RunTranslator("ses_1", "msg_u")
    tr.feed({"type": "message.updated", "properties": {"sessionID": "ses_1", "info": {
        "id": "msg_a", "role": "assistant", "time": {"completed": 1}}}})  # fmt: skip
    assert tr.outcome() is not None
    tr.lossy = True
    assert tr.outcome() is None  # the engine then reads the session history


async def test_stdout_lines_over_the_cap_are_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    script = (
        "import sys; w = sys.stdout.write; w('first\\n'); w('x' * 300_000 + '\\n'); w('y' * 99_000 + '\\n');"
        "w('second\\n'); w('z' * 500_000)"
    )
    with caplog.at_level(logging.WARNING):
        async with CLIProcess([sys.executable, "-c", script], cwd=tmp_path, env=SH_ENV, max_line=100_000) as proc:
            lines = [line async for line in proc.lines()]
            assert await proc.wait(10) == 0
    assert [len(line) for line in lines] == [5, 99_000, 6] and lines[2] == b"second"
    assert proc.dropped_lines == 2 and "300000 bytes" in caplog.text and "500000 bytes" in caplog.text


# --- which CLI failures are the task's fault ----------------------------------------------------------


LOCKED_STARTUP = "\x1b[91mError: \x1b[0mUnexpected error\n\ndatabase is locked\n"
LOCKED_QUERY = 'Error: Unexpected error\n\nFailed query: insert into "project" ("id") values (?)\nparams: global\n'


@pytest.mark.parametrize("stderr", [LOCKED_STARTUP, LOCKED_QUERY])
def test_opencode_store_failures_are_not_the_tasks_fault(stderr: str) -> None:
    tr = OpenCodeTranslator("/ws")
    with pytest.raises(EngineUnavailable, match="database") as caught:
        tr.finish(1, stderr, aborted=False)
    assert caught.value.retry_after > 0 and not tr.started  # nothing ran: safe to start again
    mid_run = OpenCodeTranslator("/ws")
    mid_run.feed({"type": "step_start", "sessionID": "ses_1", "part": {}})
    sql_error = {"name": "UnknownError", "data": {"message": "effect/sql/SqlError: Failed to execute statement"}}
    mid_run.feed({"type": "error", "error": sql_error})
    assert mid_run.started
    with pytest.raises(EngineUnavailable):
        mid_run.finish(1, "", aborted=False)


def test_other_cli_failures_stay_the_tasks() -> None:
    with pytest.raises(EngineError) as caught:
        OpenCodeTranslator("/ws").finish(1, "Error: Session not found", aborted=False)
    assert not isinstance(caught.value, EngineUnavailable)
    tr = OpenCodeTranslator("/ws")
    tr.feed({"type": "error", "error": {"name": "ProviderModelNotFoundError", "data": {"message": "nope/none"}}})
    assert not tr.started and tr.finish(1, "", aborted=False).error_type == "engine_error"
    assert STORE_BUSY.search("SQLiteError: database is locked") and not STORE_BUSY.search("model not found")


def test_a_claude_run_that_printed_anything_has_started() -> None:
    tr = ClaudeTranslator("/ws")
    assert not tr.started
    tr.feed({"type": "system", "subtype": "init", "session_id": "s1"})
    assert tr.started  # killed from here on, it is given back, not started again in place


def test_cli_engine_is_unhealthy_until_started(tmp_path: Path) -> None:
    assert not OpenCodeCLIEngine(OpenCodeCLISettings(binary="opencode", state_dir=tmp_path)).healthy()
