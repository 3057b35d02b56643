"""The CLI engines (``opencode run``, ``claude -p``): process handling, translation, and the real CLIs.

The real-CLI tests run OpenCode 1.18.33 and Claude Code against the offline model; kill tests put a
unique marker in a ``sleep`` command and check ``/proc`` for any survivor.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ocbridge.bridge.engines.base import AgentEvent, Engine, EngineError, PromptRequest
from ocbridge.bridge.engines.cli import ClaudeCodeEngine, ClaudeCodeSettings, OpenCodeCLIEngine, OpenCodeCLISettings
from ocbridge.bridge.engines.cli.claudecode import ClaudeTranslator, describe_result_error, run_cost, tool_output
from ocbridge.bridge.engines.cli.common import _Run
from ocbridge.bridge.engines.cli.opencode_cli import OpenCodeTranslator
from ocbridge.bridge.engines.cli.process import CLIProcess, run_capture
from ocbridge.bridge.offline_model.configs import claude_env, opencode_provider_config
from ocbridge.bridge.offline_model.server import OfflineModelServer
from ocbridge.bridge.processes import collect_tree, process_alive, process_of
from ocbridge.client.protocol import ModelRef

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".tools" / "npm" / "node_modules" / ".bin"
VENV_BIN = ROOT / ".venv" / "bin"
SH_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


# --- helpers ---------------------------------------------------------------------------------------


def marker() -> str:
    """A unique ``sleep`` duration: finds our process in /proc and nobody else's."""
    return f"300.{random.randrange(10**8, 10**9)}"


def processes_with(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline and int(entry) != os.getpid():
            found.append(int(entry))
    return found


async def wait_gone(text: str, timeout: float = 5.0) -> None:
    """Wait until no live process has ``text`` in its command line (polling: they are not ours)."""
    deadline = time.monotonic() + timeout
    while processes_with(text) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def wait_for_process(text: str, timeout: float = 20.0, count: int = 1) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(found := processes_with(text)) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} process(es) with {text!r} appeared within {timeout}s")


class Recorder:
    """An event sink that keeps every event."""

    def __init__(self) -> None:
        self.events: list[AgentEvent] = []

    async def __call__(self, event: AgentEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def text(self, kind: str = "text") -> str:
        return "".join(e.content or "" for e in self.events if e.kind == kind)

    def tools(self, kind: str) -> list[Any]:
        return [e.tool for e in self.events if e.kind == kind]


# --- process handling (no agent CLI) --------------------------------------------------------------


async def test_long_lines_stdin_and_stderr_tail(tmp_path: Path) -> None:
    script = "import sys; data = sys.stdin.read(); print('x' * 200_000); print(data); sys.stderr.write('e' * 5000)"
    async with CLIProcess([sys.executable, "-c", script], cwd=tmp_path, env=SH_ENV, stdin_data=b"-hello",
                          stderr_limit=1000) as proc:  # fmt: skip
        lines = [line async for line in proc.lines()]
        assert await proc.wait(10) == 0
        assert await proc.stderr_done() == "e" * 1000
    assert [len(line) for line in lines] == [200_000, 6] and lines[1] == b"-hello"


async def test_kill_tree_reaches_grandchildren_in_their_own_session(tmp_path: Path) -> None:
    mark = marker()
    # The grandchild runs in its own session, like a bash tool command of Claude Code/OpenCode, and
    # ignores SIGTERM: only the SIGKILL after the grace period stops it.
    script = f"setsid sh -c 'trap \"\" TERM; sleep {mark}' & sleep {mark}1; wait"
    async with CLIProcess(["sh", "-c", script], cwd=tmp_path, env=SH_ENV, kill_grace=0.5) as proc:
        await wait_for_process(mark + "1")
        pids = await wait_for_process(f"sleep {mark}", count=2)
        assert proc.pid is not None
        assert set(pids) <= {p.pid for p in collect_tree(process_of(proc.pid), proc.marker)}
        started = time.monotonic()
        await proc.kill_tree()
        assert time.monotonic() - started < 3
        assert proc.returncode is not None
    assert processes_with(mark) == []


async def test_cli_dies_with_its_parent(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a SIGKILLed bridge does not leave its CLI running."""
    mark = marker()
    helper = (
        "import asyncio, sys\n"
        "from ocbridge.bridge.engines.cli.process import CLIProcess\n"
        "async def main():\n"
        f"    async with CLIProcess(['sleep', '{mark}'], cwd='.', env={{'PATH': '/usr/bin:/bin'}}) as p:\n"
        "        print('started', flush=True)\n"
        "        await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", helper, cwd=ROOT, stdout=asyncio.subprocess.PIPE, start_new_session=True
    )
    try:
        assert parent.stdout is not None
        assert await asyncio.wait_for(parent.stdout.readline(), 10) == b"started\n"
        await wait_for_process(mark)
        parent.kill()
        await asyncio.wait_for(parent.wait(), 5)
        await wait_gone(mark)
        assert processes_with(mark) == []
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()


async def test_cancelling_twice_still_waits_for_the_tree_kill(tmp_path: Path) -> None:
    """A second cancel while the tree is being killed does not end the run before the kill."""
    mark = marker()

    async def run() -> None:
        # sleep ignores SIGTERM (inherited): only the SIGKILL after the grace period stops it.
        async with CLIProcess(["sh", "-c", f"trap '' TERM; sleep {mark}"], cwd=tmp_path, env=SH_ENV,
                              kill_grace=1.0):  # fmt: skip
            await asyncio.sleep(60)

    task = asyncio.create_task(run())
    await wait_for_process(mark)
    task.cancel()
    await asyncio.sleep(0.3)  # inside the grace period
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert processes_with(mark) == []


async def test_run_capture_timeout_and_missing_binary(tmp_path: Path) -> None:
    mark = marker()
    code, _, _ = await run_capture(["sleep", mark], cwd=tmp_path, env=SH_ENV, timeout=0.5)
    assert code < 0 and processes_with(mark) == []
    with pytest.raises(EngineError, match="cannot start"):
        await run_capture([str(tmp_path / "nope")], cwd=tmp_path, env=SH_ENV)


# --- translation (captured payloads) ---------------------------------------------------------------


def test_opencode_translator_sums_steps_and_keeps_last_step_text() -> None:
    t = OpenCodeTranslator("/ws")
    lines = [
        {"type": "step_start", "sessionID": "ses_1", "part": {}},
        {"type": "reasoning", "sessionID": "ses_1", "part": {"text": "hmm"}},
        {"type": "text", "sessionID": "ses_1", "part": {"text": "Let me write."}},
        {"type": "tool_use", "sessionID": "ses_1", "part": {"tool": "write", "callID": "c1", "state": {
            "status": "completed", "input": {"filePath": "a.txt", "content": "x"}, "output": "ok",
            "time": {"start": 1000, "end": 1034}}}},
        {"type": "step_finish", "part": {"tokens": {"input": 10, "output": 3, "reasoning": 2}, "cost": 0.5}},
        {"type": "step_start", "part": {}},
        {"type": "tool_use", "part": {"tool": "bash", "callID": "c2", "state": {
            "status": "error", "input": {"command": "false"}, "error": "exit 1", "time": {"start": 5, "end": 5}}}},
        {"type": "text", "part": {"text": "Done."}},
        {"type": "step_finish", "part": {"tokens": {"input": 20, "output": 4, "reasoning": 0}, "cost": 0.25}},
    ]  # fmt: skip
    events = [e for line in lines for e in t.feed(line)]
    assert [e.kind for e in events] == ["thinking", "text", "tool_start", "tool_end", "tool_start", "tool_end", "text"]
    assert events[3].tool.duration == 34 and events[3].tool.output == "ok" and events[3].tool.error is False
    assert events[5].tool.error is True and events[5].tool.output == "exit 1"
    outcome = t.finish(0, "", aborted=False)
    assert (outcome.text, outcome.prompt_tokens, outcome.completion_tokens, outcome.cost) == ("Done.", 30, 9, 0.75)
    assert outcome.tool_calls == 2 and outcome.files_edited == ["/ws/a.txt"] and outcome.session_id == "ses_1"

    failed = OpenCodeTranslator("/ws")
    failed.feed({"type": "error", "error": {"name": "APIError", "data": {"message": "boom", "statusCode": 503}}})
    outcome = failed.finish(1, "", aborted=False)
    assert outcome.error_type == "provider_error" and "boom" in (outcome.error or "")
    with pytest.raises(EngineError, match="Session not found"):
        OpenCodeTranslator("/ws").finish(1, "\x1b[91mError: \x1b[0mSession not found\n", aborted=False)
    assert OpenCodeTranslator("/ws").finish(143, "", aborted=True).aborted


def test_claude_translator_errors_and_costs() -> None:
    max_turns = {"type": "result", "subtype": "error_max_turns", "is_error": True, "num_turns": 3,
                 "errors": ["Reached maximum number of turns (2)"], "total_cost_usd": 0.2}  # fmt: skip
    message, kind = describe_result_error(max_turns)
    assert kind == "engine_error" and "maximum number of turns" in message and "(2)" in message
    overloaded = {"type": "result", "subtype": "success", "is_error": True, "api_error_status": 529,
                  "result": "API Error: 529 overloaded"}  # fmt: skip
    assert describe_result_error(overloaded) == ("API Error: 529 overloaded", "provider_error")
    during = {"subtype": "error_during_execution", "is_error": True, "errors": ["No conversation found"]}
    assert describe_result_error(during)[0] == "Claude Code failed during execution: No conversation found"

    assert run_cost({"total_cost_usd": 0.3}, baseline=0.1) == pytest.approx(0.2)
    assert run_cost({"total_cost_usd": 0.3, "model_usage_since_last_result": {"m": {"costUSD": 0.05}}}) == 0.05
    assert tool_output([{"type": "text", "text": "a"}, {"type": "image"}]) == "a\n[image]"

    t = ClaudeTranslator("/ws")
    t.feed({"type": "system", "subtype": "init", "session_id": "s1"})
    edit = {"type": "tool_use", "id": "t1", "name": "Edit", "input": {"file_path": "/ws/a", "old_string": "x"}}
    t.feed({"type": "assistant", "message": {"id": "m1", "content": [edit]}})
    result = {"type": "tool_result", "tool_use_id": "t1", "is_error": True, "content": [{"type": "text", "text": "no"}]}
    (end,) = t.feed({"type": "user", "message": {"content": [result]}})
    assert end.tool.name == "Edit" and end.tool.error is True and end.tool.output == "no" and end.tool.duration >= 0
    with pytest.raises(EngineError, match="without a result"):
        t.finish(1, "Error: Session ID s1 is already in use.", aborted=False)
    t.feed({"type": "assistant", "message": {"id": "m2", "content": [{**edit, "id": "t2"}]}})
    t.feed({"type": "user", "message": {"content": [{**result, "tool_use_id": "t2", "is_error": False}]}})
    synthetic = {"model": "<synthetic>", "id": "m3", "content": [{"type": "text", "text": "API Error: 500"}]}
    assert t.feed({"type": "assistant", "message": synthetic}) == []
    outcome = t.finish(143, "", aborted=True)
    assert outcome.aborted and outcome.session_id == "s1" and outcome.files_edited == ["/ws/a"]  # t1 failed
    assert outcome.tool_calls == 2


def test_placeholder_session_matching() -> None:
    t = OpenCodeTranslator("/ws")
    run = _Run("/ws", "", None, t)  # type: ignore[arg-type]
    assert run.matches("/ws", "") and not run.matches("/other", "")
    t.session_id = "ses_9"
    assert run.matches("/ws", "ses_9") and run.matches("/ws", "") and not run.matches("/ws", "ses_8")


# --- the real CLIs ---------------------------------------------------------------------------------


def need(binary: str) -> str:
    path = BIN / binary
    if not path.exists():
        pytest.fail(f"{binary} not installed (run scripts/setup)")
    return str(path)


@pytest.fixture(scope="module")
async def model() -> AsyncIterator[OfflineModelServer]:
    async with OfflineModelServer() as server:
        yield server


# Prices per million tokens, so that OpenCode reports a cost for the offline model.
PRICE_IN, PRICE_OUT = 1000.0, 2000.0


@pytest.fixture(scope="module", params=["opencode-cli", "claudecode"])
async def engine(request, model: OfflineModelServer, tmp_path_factory) -> AsyncIterator[Engine]:
    state = tmp_path_factory.mktemp(f"state-{request.param}")
    assert model.url is not None
    if request.param == "opencode-cli":
        config = opencode_provider_config(model.url)
        config["provider"]["offline"]["models"]["scripted"]["cost"] = {"input": PRICE_IN, "output": PRICE_OUT}
        settings = OpenCodeCLISettings(binary=need("opencode"), state_dir=state, config=config,
                                       extra_path=[str(VENV_BIN)])  # fmt: skip
        eng: Engine = OpenCodeCLIEngine(settings)
    else:
        eng = ClaudeCodeEngine(ClaudeCodeSettings(binary=need("claude"), state_dir=state, env=claude_env(model.url)))
    async with eng:
        yield eng


def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.mark.slow
async def test_write_thinking_tokens_and_resume(engine: Engine, tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    handle = await engine.open_session(ws, "first task", None)
    assert handle.created
    sink = Recorder()
    prompt = "think about files\ncreate hello.txt with content Hello CLI"
    first = await engine.run(PromptRequest(ws, handle.id, prompt), sink)

    assert (ws / "hello.txt").read_text() == "Hello CLI"
    assert first.error is None and first.text == "Done. Wrote hello.txt."
    kinds = sink.kinds()
    assert "about files" in sink.text("thinking") and "Done. Wrote hello.txt." in sink.text()
    assert kinds.index("thinking") < kinds.index("tool_start") < kinds.index("tool_end") < len(kinds) - 1
    (start,), (end,) = sink.tools("tool_start"), sink.tools("tool_end")
    assert start.name.lower() == "write" and start.call_id == end.call_id and start.args
    assert end.duration is not None and end.duration >= 0 and end.error is False and end.output
    assert first.tool_calls == 1 and first.files_edited == [str((ws / "hello.txt").resolve())]
    assert first.prompt_tokens > 0 and first.completion_tokens > 0 and first.cost > 0

    session_id = first.session_id
    assert session_id
    if isinstance(engine, OpenCodeCLIEngine):
        assert handle.id == "" and session_id.startswith("ses_")
        # Two model calls (tool call, then the answer): the cost covers both steps.
        expected = (first.prompt_tokens * PRICE_IN + first.completion_tokens * PRICE_OUT) / 1e6
        assert first.cost == pytest.approx(expected)
        listed = {s["id"]: s for s in await engine.list_sessions(ws)}
        assert listed[session_id]["title"] == "first task"
    else:
        assert handle.id == session_id  # Claude Code takes our uuid (--session-id)

    again = await engine.open_session(ws, "first task", session_id)
    assert (again.id, again.created) == (session_id, False)
    second = await engine.run(PromptRequest(ws, again.id, "recall"), Recorder())
    assert second.session_id == session_id
    assert second.text.startswith("I remember: ") and "create hello.txt with content Hello CLI" in second.text
    # Per-run figures, not session totals (Claude Code reports the session's cost once resumed).
    assert 0 < second.cost < first.cost and second.prompt_tokens > 0

    unknown = "ses_unknown" if isinstance(engine, OpenCodeCLIEngine) else str(uuid.uuid4())
    assert (await engine.open_session(ws, "t", unknown)).created


@pytest.mark.slow
async def test_concurrent_prompts_on_a_fresh_store(model: OfflineModelServer, tmp_path: Path) -> None:
    """Four tasks at once on a new ``opencode-cli`` engine. They used to fail with OpenCode's
    "database is locked" (or a migration's "Failed query: CREATE TABLE"): every ``opencode run``
    opened and migrated the shared store at the same moment."""
    assert model.url is not None
    settings = OpenCodeCLISettings(binary=need("opencode"), state_dir=tmp_path / "state",
                                   config=opencode_provider_config(model.url), extra_path=[str(VENV_BIN)])  # fmt: skip
    async with OpenCodeCLIEngine(settings) as eng:
        dirs = [tmp_path / f"ws{i}" for i in range(4)]
        handles = []
        for i, directory in enumerate(dirs):
            directory.mkdir()
            handles.append(await eng.open_session(directory, f"task {i}", None))
        requests = [PromptRequest(d, h.id, f"create f{i}.txt with content {i}") for i, (d, h) in
                    enumerate(zip(dirs, handles, strict=True))]  # fmt: skip
        outcomes = await asyncio.wait_for(asyncio.gather(*(eng.run(r, Recorder()) for r in requests)), 240)
        for i, (directory, outcome) in enumerate(zip(dirs, outcomes, strict=True)):
            assert outcome.error is None and (directory / f"f{i}.txt").read_text() == str(i)
        ids = {o.session_id for o in outcomes}
        assert len(ids) == 4 and all(i and i.startswith("ses_") for i in ids)
        # Each session stays continuable (--session), whichever run wrote it.
        again = await eng.open_session(dirs[2], "task 2", outcomes[2].session_id)
        recall = await eng.run(PromptRequest(dirs[2], again.id, "recall"), Recorder())
        assert not again.created and recall.session_id == outcomes[2].session_id
        assert recall.text == 'I remember: "create f2.txt with content 2"'
    assert eng.running == 0


@pytest.mark.slow
async def test_wire_values_are_never_options(engine: Engine, tmp_path: Path) -> None:
    """R11: a model, agent or session id from a task that an argv parser could read as an option is
    refused as the task's fault before any process starts; free text (a title) goes as one value."""
    ws = workspace(tmp_path)
    good_session = "ses_abc" if isinstance(engine, OpenCodeCLIEngine) else str(uuid.uuid4())
    bad = [
        PromptRequest(ws, good_session, "hello", model=ModelRef(provider_id="offline", model_id="--help")),
        PromptRequest(ws, good_session, "hello", agent="--dangerously-skip-permissions"),
        PromptRequest(ws, good_session, "hello", agent="-x"),
        PromptRequest(ws, "--help", "hello"),
        PromptRequest(ws, f"{good_session} --verbose", "hello"),
    ]
    for request in bad:
        with pytest.raises(EngineError) as caught:
            await engine.run(request, Recorder())
        assert caught.value.error_type == "invalid_task"
        assert engine.running == 0  # type: ignore[attr-defined]
    with pytest.raises(EngineError) as caught:
        await engine.open_session(ws, "t", "--resume")
    assert caught.value.error_type == "invalid_task"

    handle = await engine.open_session(ws, "--help -x", None)
    outcome = await engine.run(PromptRequest(ws, handle.id, "hello"), Recorder())
    assert outcome.error is None and outcome.text == "OK: hello" and engine.healthy()
    if isinstance(engine, OpenCodeCLIEngine):
        titles = {s["id"]: s["title"] for s in await engine.list_sessions(ws)}
        assert titles[outcome.session_id] == "--help -x"


@pytest.mark.slow
async def test_provider_error(engine: Engine, tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    handle = await engine.open_session(ws, "failing", None)
    outcome = await engine.run(PromptRequest(ws, handle.id, "fail 400"), Recorder())
    assert outcome.error_type == "provider_error" and "scripted failure 400" in (outcome.error or "")
    assert not outcome.aborted


@pytest.mark.slow
async def test_output_line_over_64_kib(engine: Engine, tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    handle = await engine.open_session(ws, "big", None)
    content = "0123456789abcdef" * 6400  # 100 KiB in the tool call's input: one JSON line > 64 KiB
    sink = Recorder()
    outcome = await engine.run(PromptRequest(ws, handle.id, f"create big.txt with content {content}"), sink)
    assert outcome.error is None and (ws / "big.txt").read_text() == content
    (start,) = sink.tools("tool_start")
    assert start.args["content"] == content


async def start_sleeper(engine: Engine, ws: Path, mark: str) -> tuple[str, asyncio.Task[Any]]:
    handle = await engine.open_session(ws, "sleeper", None)
    request = PromptRequest(ws, handle.id, f"run echo start; sleep {mark}; echo end")
    task = asyncio.create_task(engine.run(request, Recorder()))
    await wait_for_process(f"sleep {mark}")  # the bash tool's command (in its own session)
    return handle.id, task


@pytest.mark.slow
async def test_abort_kills_the_whole_tree(engine: Engine, tmp_path: Path) -> None:
    ws, mark = workspace(tmp_path), marker()
    session_id, task = await start_sleeper(engine, ws, mark)
    started = time.monotonic()
    await engine.abort(ws, session_id)
    outcome = await asyncio.wait_for(task, 10)
    assert time.monotonic() - started < 5
    assert outcome.aborted and outcome.error is None
    assert processes_with(mark) == []
    assert engine.running == 0  # type: ignore[attr-defined]


@pytest.mark.slow
async def test_cancelled_run_kills_the_whole_tree(engine: Engine, tmp_path: Path) -> None:
    ws, mark = workspace(tmp_path), marker()
    _, task = await start_sleeper(engine, ws, mark)
    (run,) = engine._runs  # type: ignore[attr-defined]
    cli_pid = run.proc.pid
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert processes_with(mark) == []
    assert not process_alive(cli_pid) and engine.running == 0  # type: ignore[attr-defined]


@pytest.mark.slow
async def test_run_past_max_run_seconds_is_killed(engine: Engine, tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    handle = await engine.open_session(ws, "too long", None)
    settings = engine.settings  # type: ignore[attr-defined]
    settings.max_run_seconds, saved = 1.0, settings.max_run_seconds
    started = time.monotonic()
    try:
        with pytest.raises(EngineError, match="still going after"):
            await engine.run(PromptRequest(ws, handle.id, "slow 30"), Recorder())
    finally:
        settings.max_run_seconds = saved
    assert time.monotonic() - started < 6 and engine.running == 0  # type: ignore[attr-defined]


async def test_start_fails_clearly_without_binary(tmp_path: Path) -> None:
    eng = OpenCodeCLIEngine(OpenCodeCLISettings(binary=str(tmp_path / "missing"), state_dir=tmp_path / "s"))
    with pytest.raises(EngineError, match="not an executable"):
        await eng.start()
    eng2 = ClaudeCodeEngine(ClaudeCodeSettings(binary="no-such-claude-binary", state_dir=tmp_path / "c"))
    with pytest.raises(EngineError, match="not found"):
        await eng2.start()


def test_settings_headless_config() -> None:
    config = OpenCodeCLISettings(config={"permission": {"bash": "deny"}, "model": "p/m"}).opencode_config()
    assert config["permission"] == {"*": "allow", "question": "deny", "doom_loop": "deny",
                                    "external_directory": "deny", "bash": "deny"}  # fmt: skip
    assert config["autoupdate"] is False and config["model"] == "p/m"
    assert json.dumps(config)  # goes into OPENCODE_CONFIG_CONTENT
