"""The scripted engine on its own: sessions, steps, file writes, abort."""

from __future__ import annotations

import asyncio
import os

import pytest

from ocbridge.bridge.engines.base import AgentEvent, EngineError, PromptRequest
from ocbridge.bridge.engines.scripted import (
    Delay,
    Fail,
    Raise,
    ScriptedEngine,
    Text,
    Thinking,
    Tool,
    Usage,
    WriteFile,
)
from ocbridge.client.protocol import ErrorType, ModelRef


class Recorder:
    def __init__(self) -> None:
        self.events: list[AgentEvent] = []
        self.seen: dict[str, asyncio.Event] = {}

    def reached(self, kind: str) -> asyncio.Event:
        return self.seen.setdefault(kind, asyncio.Event())

    async def __call__(self, event: AgentEvent) -> None:
        self.events.append(event)
        self.reached(event.kind).set()


async def prompt(engine: ScriptedEngine, directory, text: str = "hi", **kwargs):
    session = await engine.open_session(directory, "title", None)
    recorder = Recorder()
    outcome = await engine.run(PromptRequest(directory, session.id, text, **kwargs), recorder)
    return outcome, recorder.events


async def test_sessions_are_continued_in_their_directory_only(tmp_path):
    engine = ScriptedEngine()
    a, b = tmp_path / "a", tmp_path / "b"
    first = await engine.open_session(a, "t", None)
    assert (first.id, first.created) == ("ses_scripted_1", True)
    again = await engine.open_session(a, "t", first.id)
    assert (again.id, again.created) == (first.id, False)
    assert (await engine.open_session(b, "t", first.id)).id == "ses_scripted_2"
    assert (await engine.open_session(a, "t", "ses_from_elsewhere")).id == "ses_scripted_3"
    assert engine.sessions == {"ses_scripted_1": a, "ses_scripted_2": b, "ses_scripted_3": a}


async def test_a_list_script_is_replayed_for_every_prompt(tmp_path):
    engine = ScriptedEngine([
        Thinking("hmm"), "Hello ", Text("there"), Tool("grep", args={"pattern": "x"}, output="none", error=True),
        Tool("ls"), Usage(10, 2, 0.5), Usage(5, 1, 0.25),
    ])
    session = await engine.open_session(tmp_path, "t", None)
    outcomes = []
    for _ in range(2):
        recorder = Recorder()
        outcomes.append(await engine.run(PromptRequest(tmp_path, session.id, "go"), recorder))

    assert [e.kind for e in recorder.events] == [
        "thinking", "text", "text", "tool_start", "tool_end", "tool_start", "tool_end",
    ]
    end = recorder.events[4].tool
    assert (end.name, end.output, end.error) == ("grep", "none", True)
    ids = [e.tool.call_id for e in recorder.events if e.kind == "tool_start"]
    assert len(set(ids)) == 2
    last = outcomes[-1]
    assert (last.text, last.tool_calls, last.prompt_tokens, last.completion_tokens, last.cost) == (
        "Hello there", 2, 15, 3, 0.75,
    )
    assert [o.message_count for o in outcomes] == [1, 2] and not last.aborted and last.error is None


async def test_callable_scripts_see_the_request(tmp_path):
    async def async_steps(request):
        return [f"async {request.agent}"]

    async def generator(request):
        yield "gen "
        yield str(request.model)

    model = ModelRef.parse("prov/model-1")
    for script, expected in [
        (lambda request: f"echo: {request.prompt}", "echo: hi"),
        (async_steps, "async build"),
        (generator, "gen prov/model-1"),
    ]:
        engine = ScriptedEngine(script)
        outcome, _ = await prompt(engine, tmp_path, agent="build", model=model)
        assert outcome.text == expected
        [request] = engine.requests
        assert (request.prompt, request.agent, request.model) == ("hi", "build", model)


async def test_files_are_written_and_deleted_inside_the_workspace_only(tmp_path):
    ws = tmp_path / "ws"
    (ws / "gone.txt").parent.mkdir()
    (ws / "gone.txt").write_text("x")
    outcome, events = await prompt(ScriptedEngine([
        WriteFile("a/b.txt", "text"), WriteFile("data.bin", b"\x00\x01"), WriteFile("gone.txt", None),
    ]), ws)
    assert (ws / "a" / "b.txt").read_text() == "text" and (ws / "data.bin").read_bytes() == b"\x00\x01"
    assert not (ws / "gone.txt").exists()
    assert outcome.files_edited == ["a/b.txt", "data.bin"] and events == []

    os.symlink(tmp_path, ws / "link")
    for name in ["../outside.txt", str(tmp_path / "abs.txt"), "link/via-link.txt", "."]:
        with pytest.raises(EngineError, match="outside the workspace"):
            await prompt(ScriptedEngine([WriteFile(name, "x")]), ws)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]


async def test_abort_ends_a_delay_at_once_and_skips_the_rest(tmp_path):
    engine = ScriptedEngine(["before", Delay(None), "after"])
    a = await engine.open_session(tmp_path, "t", None)
    b = await engine.open_session(tmp_path, "t", None)
    rec_a, rec_b = Recorder(), Recorder()
    run_a = asyncio.create_task(engine.run(PromptRequest(tmp_path, a.id, "go"), rec_a))
    run_b = asyncio.create_task(engine.run(PromptRequest(tmp_path, b.id, "go"), rec_b))
    await rec_a.reached("text").wait()
    await rec_b.reached("text").wait()

    await engine.abort(tmp_path, a.id)
    outcome = await asyncio.wait_for(run_a, 1)
    assert outcome.aborted and outcome.text == "before" and outcome.message_count == 1
    assert not run_b.done()  # another session's run goes on

    await engine.aclose()  # closing the engine aborts every run
    assert (await asyncio.wait_for(run_b, 1)).aborted
    assert engine.aborts == [(tmp_path, a.id)]


async def test_a_short_delay_just_waits(tmp_path):
    outcome, events = await prompt(ScriptedEngine(["a", Delay(0.01), "b"]), tmp_path)
    assert outcome.text == "ab" and not outcome.aborted and [e.content for e in events] == ["a", "b"]


async def test_failures(tmp_path):
    outcome, events = await prompt(ScriptedEngine(["x", Fail("quota", ErrorType.PROVIDER_ERROR), "y"]), tmp_path)
    assert (outcome.error, outcome.error_type, outcome.text) == ("quota", ErrorType.PROVIDER_ERROR, "x")
    assert [e.content for e in events] == ["x"]  # the steps after Fail are skipped

    with pytest.raises(EngineError, match="boom") as raised:
        await prompt(ScriptedEngine([Raise("boom")]), tmp_path)
    assert raised.value.error_type == ErrorType.ENGINE_ERROR
    with pytest.raises(EngineError) as raised:
        await prompt(ScriptedEngine([Raise("gone", "custom_error")]), tmp_path)
    assert raised.value.error_type == "custom_error"

    with pytest.raises(TypeError, match="not a ScriptedEngine step"):
        await prompt(ScriptedEngine([42]), tmp_path)

    engine = ScriptedEngine(["x"])
    with pytest.raises(EngineError, match="unknown session"):
        await engine.run(PromptRequest(tmp_path, "ses_nobody", "hi"), Recorder())
