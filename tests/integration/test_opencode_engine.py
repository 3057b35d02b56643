"""The OpenCode HTTP engine: pure translation tests, then a real ``opencode serve`` + the offline model.

The real-server tests share one managed OpenCode per module (starting one takes ~1.5 s) and give each
test its own workspace directory.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ocbridge.bridge.engines.base import AgentEvent, EngineError, EngineUnavailable, PromptRequest
from ocbridge.bridge.engines.opencode import OpenCodeEngine, OpenCodeSettings
from ocbridge.bridge.engines.opencode.api import OpenCodeAPI, delivery_part_id, new_message_id
from ocbridge.bridge.engines.opencode.directories import dir_key
from ocbridge.bridge.engines.opencode.events import SSEParser, parse_global
from ocbridge.bridge.engines.opencode.server import check_version
from ocbridge.bridge.engines.opencode.translate import (
    RunTranslator,
    earlier_prompt,
    outcome_from_messages,
    run_finished,
)
from ocbridge.client.protocol import ModelRef

ROOT = Path(__file__).resolve().parents[2]
OPENCODE = ROOT / ".tools/npm/node_modules/.bin/opencode"
# Real payloads captured from OpenCode 1.18.33 (copied from the shared reference samples).
SAMPLES = Path(__file__).resolve().parents[1] / "support" / "data"
SAMPLE_SESSION = "ses_e036746dfffeENocylOyHXO5y5"


def sample(name: str) -> Any:
    path = SAMPLES / name
    if name.endswith(".jsonl"):
        return [json.loads(line)["event"] for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------ translate


def test_translator_on_captured_write_prompt() -> None:
    events = sample("opencode_sse_events_one_prompt.jsonl")
    tr = RunTranslator(SAMPLE_SESSION)
    out = [e for payload in events for e in tr.feed(payload)]
    kinds = [e.kind for e in out]
    assert kinds == ["tool_start", "tool_end", "text", "text", "text", "text"]
    start, end = out[0].tool, out[1].tool
    assert start.name == "write" and start.call_id == "call_6cd2b5842f6a"
    assert start.args == {"filePath": "/workspaces/ws_main/hello.txt", "content": "Hello World"}
    completed = next(
        p["properties"]["part"]
        for p in events
        if p["type"] == "message.part.updated" and p["properties"]["part"].get("state", {}).get("status") == "completed"
    )
    times = completed["state"]["time"]
    assert end.output == "Wrote file successfully." and end.error is False
    assert end.duration == times["end"] - times["start"] > 0
    # The user's own text part ("create hello.txt ...") is not reported as agent text.
    assert "".join(e.content for e in out if e.kind == "text") == "Done. Wrote file successfully."
    assert (tr.prompt_tokens, tr.completion_tokens, tr.tool_calls) == (2452 + 2539, 36 + 10, 1)
    assert "/workspaces/ws_main/hello.txt" in tr.files_edited


def test_translator_reasoning_whole_parts_and_errors() -> None:
    sid, user, asst = "ses_x", "msg_u", "msg_a"

    def ev(kind: str, **props: Any) -> dict[str, Any]:
        return {"type": kind, "properties": {"sessionID": sid, **props}}

    tr = RunTranslator(sid, user)
    feed = [
        ev("message.updated", info={"id": user, "role": "user"}),
        ev(
            "message.part.updated",
            part={"id": "p0", "messageID": user, "type": "text", "text": "hi", "time": {"end": 1}},
        ),
        ev("message.updated", info={"id": asst, "role": "assistant"}),
        ev("message.part.updated", part={"id": "p1", "messageID": asst, "type": "reasoning", "text": ""}),
        ev("message.part.delta", messageID=asst, partID="p1", field="text", delta="hmm "),
        ev(
            "message.part.updated",
            part={"id": "p1", "messageID": asst, "type": "reasoning", "text": "hmm ", "time": {"end": 2}},
        ),
        # A text part that arrives whole, without deltas, is still reported (once).
        ev(
            "message.part.updated",
            part={"id": "p2", "messageID": asst, "type": "text", "text": "Hel", "time": {"start": 1}},
        ),
        ev(
            "message.part.updated",
            part={"id": "p2", "messageID": asst, "type": "text", "text": "Hello", "time": {"end": 3}},
        ),
        ev(
            "message.part.updated",
            part={"id": "p2", "messageID": asst, "type": "text", "text": "Hello", "time": {"end": 3}},
        ),
        ev(
            "message.part.updated",
            part={
                "id": "p3",
                "messageID": asst,
                "type": "tool",
                "tool": "bash",
                "callID": "c1",
                "state": {
                    "status": "error",
                    "input": {"command": "false"},
                    "error": "boom",
                    "time": {"start": 10, "end": 25},
                },
            },
        ),
        ev("session.error", error={"name": "APIError", "data": {"message": "x"}}),
        {
            "type": "message.part.delta",
            "properties": {"sessionID": "other", "messageID": "m", "partID": "q", "field": "text", "delta": "not ours"},
        },
    ]
    out = [e for payload in feed for e in tr.feed(payload)]
    assert [(e.kind, e.content) for e in out[:2]] == [("thinking", "hmm "), ("text", "Hello")]
    assert [e.kind for e in out[2:]] == ["tool_start", "tool_end"]
    assert out[3].tool.error is True and out[3].tool.output == "boom" and out[3].tool.duration == 15
    assert tr.saw_user_message and tr.error["name"] == "APIError"


def test_outcome_from_captured_messages() -> None:
    messages = sample("opencode_session_messages.json")
    user_id = messages[0]["info"]["id"]
    outcome = outcome_from_messages(messages, user_id)
    assert outcome.text == "Done. Wrote file successfully."
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (2452 + 2539, 36 + 10)
    assert (outcome.tool_calls, outcome.message_count, outcome.aborted, outcome.error) == (1, 1, False, None)
    assert outcome.files_edited == ["/workspaces/ws_main/hello.txt"]
    assert run_finished(messages, user_id)

    aborted = sample("opencode_session_messages_aborted.json")
    outcome = outcome_from_messages(aborted, aborted[0]["info"]["id"])
    assert outcome.aborted and outcome.error is None and outcome.text == "slow slow slow"

    failed = [
        aborted[0],
        {
            "info": {
                **aborted[1]["info"],
                "error": {"name": "APIError", "data": {"message": "bad request", "statusCode": 400}},
            },
            "parts": [],
        },
    ]
    outcome = outcome_from_messages(failed, None)
    assert outcome.error_type == "provider_error" and "bad request" in outcome.error and "400" in outcome.error
    assert not run_finished(aborted[:1], aborted[0]["info"]["id"])


def test_sse_parser_handles_splits_multiline_comments_and_huge_lines() -> None:
    big = "x" * 300_000
    stream = (
        b": heartbeat comment\r\n\r\n"
        b'data: {"a":\r\ndata: 1}\r\n\r\n'
        b"event: message\nid: 7\ndata: "
        + json.dumps({"payload": {"type": "t", "properties": {"s": big}}, "directory": "/w"}).encode()
        + b"\n\n"
        b"data: last\r\r\n"
    )
    for step in (1, 7, 4096, len(stream)):
        parser, got = SSEParser(), []
        for i in range(0, len(stream), step):
            got += parser.feed(stream[i : i + step])
        assert got[0] == '{"a":\n1}' and got[2] == "last", step
        event = parse_global(got[1])
        assert event.directory == "/w" and event.type == "t" and len(event.properties["s"]) == len(big)


def test_settings_versions_and_message_ids(caplog: pytest.LogCaptureFixture) -> None:
    s = OpenCodeSettings(config={"model": "offline/scripted", "permission": {"bash": "ask"}})
    config = s.opencode_config()
    assert config["permission"] == {
        "*": "allow",
        "question": "deny",
        "doom_loop": "deny",
        "external_directory": "deny",
        "bash": "ask",
    }
    assert config["model"] == "offline/scripted" and config["autoupdate"] is False
    assert s.permission_reply("bash") == "once" and s.permission_reply("external_directory") == "reject"
    assert OpenCodeSettings(permission_policy="deny").permission_reply("bash") == "reject"

    check_version("1.18.33")
    with pytest.raises(EngineError, match="not supported"):
        check_version("2.0.1")
    with caplog.at_level(logging.WARNING):
        check_version("1.17.2")
    assert "not been tested" in caplog.text

    ids = [new_message_id() for _ in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert all(i.startswith("msg_") and len(i) == 30 for i in ids)


def test_a_task_message_finds_its_prompt_in_the_history_on_a_later_attempt():
    """The prompt's text part id is the same for every delivery of one task message in one
    session, and differs for another message or session; the history lookup finds the user
    message holding it (never an assistant's)."""
    part = delivery_part_id("t-1 7", "ses_a")
    assert part == delivery_part_id("t-1 7", "ses_a") and part.startswith("prt_") and len(part) == 30
    assert len({part, delivery_part_id("t-1 8", "ses_a"), delivery_part_id("t-1 7", "ses_b")}) == 3
    history = [
        {"info": {"id": "msg_1", "role": "user"}, "parts": [{"id": "prt_other"}]},
        {"info": {"id": "msg_2", "role": "user"}, "parts": [{"id": part}]},
        {"info": {"id": "msg_3", "role": "assistant"}, "parts": [{"id": part}]},
        {"info": {"id": "msg_4", "role": "user"}, "parts": [{"id": "prt_later"}]},
        {"info": {"id": "msg_5", "role": "assistant", "error": {"name": "MessageAbortedError"}}, "parts": []},
    ]
    assert earlier_prompt(history[:3], part) == ("msg_2", True)  # cut off or finished: carried on
    assert earlier_prompt(history[:1], part) is None
    assert earlier_prompt(history, part) == ("msg_2", False)  # another prompt came after it
    history[2]["info"]["error"] = {"name": "MessageAbortedError"}
    assert earlier_prompt(history[:3], part) == ("msg_2", False)  # aborted: OpenCode would not go on


# ------------------------------------------------------------------------------- real OpenCode


class Recorder:
    """An ``on_event`` sink that keeps every event with its arrival time."""

    def __init__(self) -> None:
        self.events: list[AgentEvent] = []
        self.times: list[float] = []
        self.first = asyncio.Event()
        self.tool_started = asyncio.Event()
        self.text_after_tool = asyncio.Event()

    async def __call__(self, event: AgentEvent) -> None:
        self.events.append(event)
        self.times.append(time.monotonic())
        self.first.set()
        if event.kind == "tool_start":
            self.tool_started.set()
        if event.kind == "text" and self.tool_started.is_set():
            self.text_after_tool.set()

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def text(self, kind: str = "text") -> str:
        return "".join(e.content or "" for e in self.events if e.kind == kind)


@pytest.fixture(scope="module")
async def model() -> AsyncIterator[str]:
    from ocbridge.bridge.offline_model.server import OfflineModelServer

    server = OfflineModelServer()
    url = await server.start()
    yield url
    await server.stop()


def settings_for(model_url: str, state_dir: Path, **overrides: Any) -> OpenCodeSettings:
    from ocbridge.bridge.offline_model.configs import opencode_provider_config

    if not OPENCODE.exists():
        pytest.fail("opencode is not installed: run scripts/setup")
    values: dict[str, Any] = {
        "binary": str(OPENCODE),
        "state_dir": state_dir,
        "config": opencode_provider_config(model_url + "/v1"),
        "extra_path": [str(ROOT / ".venv/bin")],
        "idle_dispose_seconds": 1.0,
        "restart_backoff": 0.2,
        "status_poll_interval": 1.0,
    }
    values.update(overrides)
    return OpenCodeSettings(**values)


@pytest.fixture(scope="module")
async def engine(model: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[OpenCodeEngine]:
    eng = OpenCodeEngine(settings_for(model, tmp_path_factory.mktemp("opencode-state")))
    started = time.monotonic()
    await eng.start()
    logging.getLogger(__name__).info("opencode engine started in %.2fs", time.monotonic() - started)
    yield eng
    process = eng.process
    await eng.aclose()
    assert process is not None and process.pid is None  # reaped


async def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    return path


async def run(engine: OpenCodeEngine, ws: Path, sid: str, prompt: str, rec: Recorder | None = None):
    return await asyncio.wait_for(engine.run(PromptRequest(ws, sid, prompt), rec or Recorder()), 30)


@pytest.mark.opencode
async def test_write_prompt_streams_events_and_creates_file(engine: OpenCodeEngine, workspace: Path) -> None:
    handle = await engine.open_session(workspace, "write test", None)
    assert handle.created and handle.id.startswith("ses_")
    rec = Recorder()
    outcome = await run(engine, workspace, handle.id, "create hello.txt with content Hello World", rec)
    assert (workspace / "hello.txt").read_text() == "Hello World"
    kinds = rec.kinds()
    assert kinds.index("tool_start") < kinds.index("tool_end") < kinds.index("text")
    start, end = rec.events[kinds.index("tool_start")].tool, rec.events[kinds.index("tool_end")].tool
    assert start.name == "write" and start.args["content"] == "Hello World"
    assert end.call_id == start.call_id and end.error is False and end.duration is not None
    assert kinds.count("text") >= 2  # streamed as deltas
    assert outcome.text == rec.text() and "hello.txt" in outcome.text
    assert outcome.prompt_tokens > 0 and outcome.completion_tokens > 0
    assert (outcome.tool_calls, outcome.message_count, outcome.error) == (1, 1, None)
    assert str(workspace / "hello.txt") in outcome.files_edited
    await engine.release(workspace)


@pytest.mark.opencode
async def test_second_prompt_continues_the_session(engine: OpenCodeEngine, workspace: Path) -> None:
    first = await engine.open_session(workspace, "memory", None)
    await run(engine, workspace, first.id, "the password is swordfish")
    again = await engine.open_session(workspace, "memory", first.id)
    assert again.id == first.id and not again.created
    outcome = await run(engine, workspace, first.id, "recall")
    assert outcome.message_count == 2 and "swordfish" in outcome.text
    await engine.release(workspace)
    assert first.id in engine._exchanges  # still in use: its count is kept
    await engine.release(workspace)
    assert first.id not in engine._exchanges  # no task uses the directory: forgotten (R10)


@pytest.mark.opencode
async def test_concurrent_runs_keep_their_events_apart(engine: OpenCodeEngine, tmp_path: Path) -> None:
    jobs = []
    for name in ("a", "b"):
        directory = tmp_path / name
        directory.mkdir()
        for n in range(2):  # two sessions per directory
            handle = await engine.open_session(directory, f"{name}{n}", None)
            jobs.append((directory, handle.id, f"{name}{n}.txt", Recorder()))
    outcomes = await asyncio.gather(
        *(run(engine, d, sid, f"create {file} with content {sid}", rec) for d, sid, file, rec in jobs)
    )
    for (directory, sid, file, rec), outcome in zip(jobs, outcomes, strict=True):
        assert (directory / file).read_text() == sid
        assert outcome.files_edited == [str(directory / file)] and outcome.error is None
        (start,) = [e.tool for e in rec.events if e.kind == "tool_start"]
        assert start.args["content"] == sid and file in rec.text()
    for name in ("a", "b"):
        await engine.release(tmp_path / name)
        await engine.release(tmp_path / name)


@pytest.mark.opencode
async def test_bash_tool_duration_and_thinking(engine: OpenCodeEngine, workspace: Path) -> None:
    handle = await engine.open_session(workspace, "bash", None)
    rec = Recorder()
    outcome = await run(engine, workspace, handle.id, "think about sleeping\nrun sleep 0.3 && echo woke", rec)
    end = next(e.tool for e in rec.events if e.kind == "tool_end")
    assert end.name == "bash" and "woke" in end.output and end.duration >= 250
    assert rec.text("thinking") and rec.kinds().index("thinking") < rec.kinds().index("tool_start")
    assert outcome.error is None and outcome.tool_calls == 1
    await engine.release(workspace)


@pytest.mark.opencode
async def test_abort_during_slow_stream(engine: OpenCodeEngine, workspace: Path) -> None:
    handle = await engine.open_session(workspace, "abort", None)
    rec = Recorder()
    task = asyncio.create_task(run(engine, workspace, handle.id, "slow 20", rec))
    await asyncio.wait_for(rec.first.wait(), 15)
    asked = time.monotonic()
    await engine.abort(workspace, handle.id)
    outcome = await asyncio.wait_for(task, 5)
    assert time.monotonic() - asked < 3
    assert outcome.aborted and outcome.error is None and outcome.text.startswith("slow")
    await engine.release(workspace)


@pytest.mark.opencode
async def test_run_ends_by_polling_when_the_stream_is_down(engine: OpenCodeEngine, workspace: Path) -> None:
    handle = await engine.open_session(workspace, "no stream", None)
    rec = Recorder()
    task = asyncio.create_task(run(engine, workspace, handle.id, "slow 1.5", rec))
    await asyncio.wait_for(rec.first.wait(), 15)
    assert engine.events is not None
    await engine.events.stop()  # no more events: only the status poll can tell the run is over
    try:
        outcome = await asyncio.wait_for(task, 15)
    finally:
        await engine.events.start()
    assert outcome.text.startswith("slow") and outcome.error is None and not outcome.aborted
    await engine.release(workspace)


async def poll_history(engine: OpenCodeEngine, ws: Path, sid: str, ready: Callable[[list[Any]], bool]) -> list[Any]:
    """The session history once ``ready(assistant messages)`` holds (polling the real server)."""
    assert engine.api is not None
    for _ in range(400):
        messages = await engine.api.messages(str(ws), sid)
        assistants = [m for m in messages if m["info"]["role"] == "assistant"]
        if ready(assistants):
            return messages
        await asyncio.sleep(0.05)
    raise AssertionError(f"the history of {sid} never got there: {messages}")


@pytest.mark.opencode
async def test_outcome_after_a_gap_in_the_stream_comes_from_the_history(
    engine: OpenCodeEngine, workspace: Path
) -> None:
    """B4: the stream drops mid-run and reconnects; the first step (a tool call) ended meanwhile,
    so its tokens were only in lost events. The outcome still counts and says everything."""
    handle = await engine.open_session(workspace, "gap", None)
    events = engine.events
    assert events is not None
    rec = Recorder()
    task = asyncio.create_task(run(engine, workspace, handle.id, "run sleep 1.5 && echo one\nslow 3", rec))
    await asyncio.wait_for(rec.tool_started.wait(), 15)
    await events.stop()  # the stream drops: what OpenCode sends from now on is lost
    connections = events.connections

    def second_step_streaming(assistants: list[Any]) -> bool:
        # The first step (tool call) is over and the answer has begun: its text part exists (its
        # text is stored only at the end; the deltas in between are events only).
        return (
            len(assistants) == 2
            and bool(assistants[0]["info"].get("time", {}).get("completed"))
            and not assistants[1]["info"].get("time", {}).get("completed")
            and any(p["type"] == "text" for p in assistants[1]["parts"])
        )

    await poll_history(engine, workspace, handle.id, second_step_streaming)
    await events.start()  # reconnected: the run is told events may be missing
    outcome = await asyncio.wait_for(task, 30)

    assert engine.api is not None
    history = await engine.api.messages(dir_key(workspace), handle.id)
    assistants = [m["info"] for m in history if m["info"]["role"] == "assistant"]
    assert events.connections == connections + 1 and len(assistants) == 2
    final_text = "".join(p.get("text", "") for p in history[-1]["parts"] if p["type"] == "text").strip()
    assert outcome.text == final_text and outcome.text.startswith("slow slow")
    assert outcome.text.endswith(rec.text())  # what the live stream showed, after the gap
    assert outcome.prompt_tokens == sum(a["tokens"]["input"] for a in assistants) > assistants[1]["tokens"]["input"]
    assert outcome.completion_tokens == sum(a["tokens"]["output"] + a["tokens"]["reasoning"] for a in assistants)
    assert (outcome.tool_calls, outcome.message_count, outcome.error) == (1, 1, None)
    await engine.release(workspace)


@pytest.mark.opencode
async def test_session_ids_from_outside_never_reach_a_url(engine: OpenCodeEngine, workspace: Path) -> None:
    """R17: an id from KV or the wire is checked before it becomes a path segment."""
    assert engine.api is not None
    for bad in ("../../global/health", "ses_x/../../config", "ses_1?directory=/etc", "-x", "ses_ 1"):
        for attempt in (
            engine.run(PromptRequest(workspace, bad, "hello"), Recorder()),
            engine.open_session(workspace, "t", bad),
            engine.abort(workspace, bad),
            engine.api.get_session(str(workspace), bad),
        ):
            with pytest.raises(EngineError) as caught:
                await attempt
            assert caught.value.error_type == "invalid_task", bad
    assert not engine.directories.in_use(str(workspace))  # nothing held by the refused calls


@pytest.mark.opencode
async def test_provider_error(engine: OpenCodeEngine, workspace: Path) -> None:
    handle = await engine.open_session(workspace, "fail", None)
    outcome = await run(engine, workspace, handle.id, "fail 400")
    assert outcome.error_type == "provider_error" and "400" in outcome.error and not outcome.aborted
    await engine.release(workspace)


@pytest.mark.opencode
async def test_unknown_existing_session_creates_a_new_one(engine: OpenCodeEngine, workspace: Path) -> None:
    handle = await engine.open_session(workspace, "unknown", "ses_doesnotexist0000000000000")
    assert handle.created and handle.id != "ses_doesnotexist0000000000000"
    outcome = await run(engine, workspace, handle.id, "hello")
    assert outcome.message_count == 1 and outcome.error is None
    await engine.release(workspace)


@pytest.mark.opencode
async def test_rejected_prompts_end_with_an_error(engine: OpenCodeEngine, workspace: Path) -> None:
    handle = await engine.open_session(workspace, "bad", None)
    request = PromptRequest(workspace, handle.id, "hello", agent="no-such-agent")
    outcome = await asyncio.wait_for(engine.run(request, Recorder()), 10)
    assert outcome.error_type == "engine_error" and "no-such-agent" in outcome.error
    request = PromptRequest(workspace, handle.id, "hello", model=ModelRef.parse("nope/none"))
    outcome = await asyncio.wait_for(engine.run(request, Recorder()), 10)
    assert outcome.error_type == "engine_error" and "nope/none" in outcome.error
    await engine.release(workspace)


@pytest.mark.opencode
async def test_cancelled_run_is_aborted(engine: OpenCodeEngine, workspace: Path) -> None:
    handle = await engine.open_session(workspace, "cancel", None)
    rec = Recorder()
    task = asyncio.create_task(run(engine, workspace, handle.id, "slow 20", rec))
    await asyncio.wait_for(rec.first.wait(), 15)
    task.cancel()  # what the pipeline does on a timeout
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.api is not None
    api, directory = engine.api, str(workspace)
    for _ in range(60):
        idle = handle.id not in await api.session_status(directory)
        if idle:
            break
        await asyncio.sleep(0.05)
    assert idle, "the cancelled run kept going in OpenCode"
    await engine.release(workspace)


@pytest.mark.opencode
async def test_a_later_attempt_of_a_task_message_carries_the_run_on(engine: OpenCodeEngine, workspace: Path) -> None:
    """A run that finished, sent again as a later attempt of the same task message (its sidecar
    died before the result went out), ends at once with the same outcome: no second write, one
    exchange. A run that was aborted (a give-back stops it) is not carried on: OpenCode would not
    answer it again, so its next attempt prompts afresh and completes. (A run cut off by a dead
    sidecar is carried on: ``test_faults.py``.)"""
    handle = await engine.open_session(workspace, "carry", None)
    first = PromptRequest(workspace, handle.id, "create carried.txt with content x", delivery="t-9 4")
    done = await asyncio.wait_for(engine.run(first, Recorder()), 30)
    assert (done.message_count, done.tool_calls, done.error) == (1, 1, None)

    again = Recorder()
    replay = await asyncio.wait_for(engine.run(dataclasses.replace(first, attempt=2), again), 30)
    assert "tool_start" not in again.kinds(), "the write was made again"
    assert (replay.message_count, replay.tool_calls, replay.text, replay.aborted) == (1, 1, done.text, False)

    slow = PromptRequest(workspace, handle.id, "slow 3", delivery="t-10 5")
    rec = Recorder()
    cut = asyncio.create_task(engine.run(slow, rec))
    await asyncio.wait_for(rec.first.wait(), 15)
    cut.cancel()  # given back: the run is aborted
    with pytest.raises(asyncio.CancelledError):
        await cut
    assert engine.api is not None
    part = delivery_part_id(slow.delivery, handle.id)
    for _ in range(100):  # the abort is sent in the background; a redelivery comes later
        found = earlier_prompt(await engine.api.messages(str(workspace), handle.id), part)
        if found is not None and not found[1]:
            break
        await asyncio.sleep(0.05)
    assert found is not None and not found[1], "the run was not aborted"
    fresh = await asyncio.wait_for(engine.run(dataclasses.replace(slow, attempt=2), Recorder()), 30)
    assert (fresh.message_count, fresh.aborted, fresh.error) == (3, False, None), fresh
    await engine.release(workspace)


@pytest.mark.opencode
async def test_permissions_are_answered_by_policy(engine: OpenCodeEngine, workspace: Path) -> None:
    # A session whose own rules make bash ask: the engine answers "once" and the run completes.
    assert engine.api is not None
    info = await engine.api.create_session(
        str(workspace), "ask", permission=[{"permission": "bash", "pattern": "*", "action": "ask"}]
    )
    rec = Recorder()
    outcome = await run(engine, workspace, info["id"], "run echo permitted", rec)
    end = next(e.tool for e in rec.events if e.kind == "tool_end")
    assert end.error is False and "permitted" in end.output and outcome.error is None
    # Writing outside the session directory is refused (tool error), not left hanging.
    rec = Recorder()
    outside = workspace.parent / "outside.txt"
    outcome = await run(engine, workspace, info["id"], f"create {outside} with content nope", rec)
    end = next(e.tool for e in rec.events if e.kind == "tool_end")
    assert end.error is True and not outside.exists() and outcome.error is None


@pytest.mark.opencode
async def test_idle_directories_are_disposed_and_sessions_survive(engine: OpenCodeEngine, tmp_path: Path) -> None:
    idle, busy = tmp_path / "idle", tmp_path / "busy"
    idle.mkdir(), busy.mkdir()
    # busy is registered first and used last before the release of idle, so if it were
    # disposable the reaper would dispose it no later than idle.
    held = await engine.open_session(busy, "held", None)
    first = await engine.open_session(idle, "dispose", None)
    await run(engine, idle, first.id, "remember the number 4217")
    await run(engine, busy, held.id, "hello")
    await engine.release(idle)  # busy stays held (in use)
    assert await wait_until(lambda: str(idle) in engine.disposed, 10)
    assert str(busy) not in engine.disposed
    again = await engine.open_session(idle, "dispose", first.id)
    assert not again.created
    rec = Recorder()  # the reloaded instance's events still reach the one global stream
    outcome = await run(engine, idle, first.id, "recall", rec)
    assert "4217" in outcome.text and outcome.message_count == 2 and rec.text() == outcome.text
    await engine.release(idle)
    await engine.release(busy)


def basic(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"opencode:{password}".encode()).decode()}


@pytest.mark.opencode
async def test_password_protects_the_server(engine: OpenCodeEngine) -> None:
    assert engine.process is not None and engine.url is not None
    password = engine.process.password
    async with aiohttp.ClientSession() as http:
        async with http.get(engine.url + "/session") as resp:
            assert resp.status == 401
        async with http.get(engine.url + "/session", headers=basic("wrong")) as resp:
            assert resp.status == 401
        async with http.get(engine.url + "/global/health", headers=basic(password)) as resp:
            assert resp.status == 200 and (await resp.json())["version"].startswith("1.")
    api = OpenCodeAPI(engine.url, password="wrong")
    with pytest.raises(EngineError, match="401") as caught:
        await api.health()
    await api.aclose()
    assert password not in str(caught.value)
    assert engine.process.log_path is not None
    assert password not in engine.process.log_path.read_text()


@pytest.mark.opencode
async def test_connect_to_existing_server(engine: OpenCodeEngine, model: str, workspace: Path) -> None:
    assert engine.process is not None
    settings = OpenCodeSettings(url=engine.url, password=engine.process.password)
    async with OpenCodeEngine(settings) as attached:
        handle = await attached.open_session(workspace, "attached", None)
        outcome = await run(attached, workspace, handle.id, "create a.txt with content attached")
        assert (workspace / "a.txt").read_text() == "attached" and outcome.error is None
    assert engine.process.pid is not None  # the managed server is still running


def pids_running(command: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if cmdline.read().replace(b"\0", b" ").strip() == command.encode():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.opencode
async def test_server_killed_mid_run_is_restarted(engine: OpenCodeEngine, workspace: Path) -> None:
    process = engine.process
    assert process is not None and process.pid is not None and engine.events is not None
    handle = await engine.open_session(workspace, "restart", None)
    await run(engine, workspace, handle.id, "remember the colour teal")
    rec = Recorder()  # a tool command in flight (OpenCode runs it in its own session)
    task = asyncio.create_task(run(engine, workspace, handle.id, "run sleep 4.7", rec))
    await asyncio.wait_for(rec.first.wait(), 15)
    assert await wait_until(lambda: bool(pids_running("sleep 4.7")), 5)
    in_flight = pids_running("sleep 4.7")
    restarts, killed_at = process.restarts, time.monotonic()
    assert engine.healthy()
    os.kill(process.pid, signal.SIGKILL)
    assert await wait_until(lambda: not engine.healthy(), 5)  # the worker stops fetching until it is back
    assert await wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in in_flight), 5), (
        "orphaned tool command left running")
    # The run carries on with the new server from the session's history (no give-back, no second
    # prompt): the interrupted command shows as such to the model, which runs it again.
    outcome = await asyncio.wait_for(task, 40)
    assert outcome.error is None and outcome.text.count("Ran `sleep 4.7`") == 1, outcome
    assert outcome.tool_calls == 2 and outcome.message_count == 2, outcome
    assert engine.api is not None
    history = await engine.api.messages(dir_key(workspace), handle.id)
    prompts = [part.get("text") for message in history if message["info"]["role"] == "user"
               for part in message.get("parts") or [] if part.get("type") == "text"]
    assert prompts == ["remember the colour teal", "run sleep 4.7"]  # sent again, not added twice
    assert engine.healthy() and process.restarts == restarts + 1
    logging.getLogger(__name__).info("run carried on %.2fs after the kill", time.monotonic() - killed_at)
    again = await engine.open_session(workspace, "restart", handle.id)
    assert not again.created
    outcome = await run(engine, workspace, handle.id, "recall")
    assert "teal" in outcome.text and outcome.error is None
    assert outcome.message_count == 3  # counted from the history again: one user message per prompt
    await engine.release(workspace)
    # Killed while idle: the next calls wait for the replacement instead of failing.
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)
    again = await asyncio.wait_for(engine.open_session(workspace, "restart", handle.id), 30)
    outcome = await run(engine, workspace, again.id, "recall")
    assert not again.created and "teal" in outcome.text and process.restarts == restarts + 2
    await engine.release(workspace)
    await engine.release(workspace)


@pytest.mark.opencode
async def test_a_run_whose_server_does_not_come_back_is_given_back(model: str, tmp_path: Path) -> None:
    """Killed mid-run and not restarted within ``startup_timeout``: not the task's fault, so the
    run ends with :class:`EngineUnavailable` (the worker gives the task back), not an error."""
    settings = settings_for(model, tmp_path / "state", startup_timeout=8.0, restart_backoff=0.5)
    async with OpenCodeEngine(settings) as eng:
        process = eng.process
        assert process is not None and process.pid is not None
        workspace = tmp_path / "ws"
        workspace.mkdir()
        handle = await eng.open_session(workspace, "no comeback", None)
        rec = Recorder()
        task = asyncio.create_task(run(eng, workspace, handle.id, "run sleep 9.3", rec))
        await asyncio.wait_for(rec.first.wait(), 15)
        settings.binary = str(tmp_path / "missing-opencode")  # every restart fails from here on
        killed_at = time.monotonic()
        os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(EngineUnavailable, match="lost during the run") as lost:
            await asyncio.wait_for(task, 25)
        assert lost.value.retry_after > 0 and time.monotonic() - killed_at >= settings.startup_timeout
        assert not eng.healthy()


@pytest.mark.opencode
async def test_hung_server_is_replaced(model: str, tmp_path: Path) -> None:
    settings = settings_for(model, tmp_path / "state", health_interval=0.3, health_failures=2, stop_timeout=1.0)
    async with OpenCodeEngine(settings) as eng:
        process, events = eng.process, eng.events
        assert process is not None and process.pid is not None and events is not None
        hung = process.pid
        os.kill(hung, signal.SIGSTOP)  # alive but silent: only the health checks can tell
        # ">= 1": on a loaded machine the replacement may itself miss two 1 s health checks while
        # it loads, and be replaced in turn; what matters is that a live server answers again.
        assert await wait_until(
            lambda: process.restarts >= 1 and process.pid != hung and process.answering and events.connected.is_set(),
            60,
        )
        with pytest.raises(ProcessLookupError):
            os.kill(hung, 0)  # killed and reaped
        settings.health_interval = 30.0  # no false alarms on a loaded machine from here on
        workspace = tmp_path / "ws"
        workspace.mkdir()
        handle = await eng.open_session(workspace, "after hang", None)
        outcome = await run(eng, workspace, handle.id, "hello")
        assert outcome.error is None and outcome.message_count == 1
