"""The whole task pipeline in-process, driven by the scripted engine: what Station would see.

Workspace, session record, live events, timeout, cancellation, change report and result, with no
OpenCode, model or NATS. Every test runs in milliseconds. Slow steps are simulated with stores and
scripts that block on events the test controls, never with sleeps.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import nats.errors
import pytest

from ocbridge.bridge.config import load_config
from ocbridge.bridge.engines.base import EngineUnavailable
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
from ocbridge.bridge.inprocess.runner import LocalRunner
from ocbridge.bridge.pipeline import RetryTask, TaskPipeline, build_runtime
from ocbridge.bridge.redact import MASK, Redactor
from ocbridge.bridge.storage.leases import MemoryKeyValue
from ocbridge.bridge.storage.stores import FolderArtifacts, FolderKeyValue, RevisionMismatch
from ocbridge.client.protocol import ErrorType, FileChange, StreamEvent, Task, TaskResult, TaskStatus

SECRET = "hunter2-very-secret-value"


@pytest.fixture
def config(tmp_path):
    return load_config(
        overrides={"workspace_root": str(tmp_path / "workspaces"), "data_dir": str(tmp_path / "data")},
        environ={},
    )


def make_task(task_id: str = "t1", prompt: str = "do the thing", *, session: str = "s1", workspace: str = "ws",
              reuse: bool | None = None, timeout: int | None = None, files: list[str] | None = None) -> Task:
    return Task.model_validate({
        "taskID": task_id,
        "session": {"name": session, **({} if reuse is None else {"continue": reuse})},
        "workspace": {"name": workspace},
        "prompt": prompt,
        "timeout": timeout,
        "files": files,
        "callback": {"streamSubject": f"stream.{task_id}", "resultSubject": f"result.{task_id}"},
    })


async def run(runner: LocalRunner, task: Task, on_event=None) -> tuple[TaskResult, list[StreamEvent]]:
    events: list[StreamEvent] = []

    async def collect(event: StreamEvent) -> None:
        events.append(event)
        if on_event is not None:
            on_event(event)

    result = await runner.run(task, collect)
    return result, events


def runner(config, engine: ScriptedEngine, redactor: Redactor | None = None) -> LocalRunner:
    return LocalRunner(config, engine=engine, redactor=redactor or Redactor())


def types(events: list[StreamEvent]) -> list[str]:
    return [e.type for e in events]


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        cwd=cwd, env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()


async def test_events_arrive_in_station_order_and_the_result_counts_them(config):
    engine = ScriptedEngine([
        Thinking("Let me look. "), Thinking("Then answer."),
        "Hel", "lo",
        Tool("read", args={"filePath": "a.txt"}, output="contents", duration=7),
        " world",
        Usage(prompt_tokens=120, completion_tokens=30, cost=0.25),
    ])
    async with runner(config, engine) as r:
        result, events = await run(r, make_task())

    assert types(events) == [
        "workspace_created", "session_created", "prompt_sent", "thinking", "text", "tool_start", "tool_end", "text",
    ]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert {e.task_id for e in events} == {"t1"}
    assert events[0].content == result.workspace.path
    assert events[1].session.name == "s1" and events[1].session.opencode_id == "ses_scripted_1"
    assert events[2].content == "do the thing"
    assert events[3].content == "Let me look. Then answer."
    assert events[4].content == "Hello"  # deltas coalesced into one event
    start, end = events[5].tool, events[6].tool
    assert (start.name, start.args, start.call_id) == ("read", {"filePath": "a.txt"}, end.call_id)
    assert (end.output, end.duration, end.error) == ("contents", 7, False)
    assert events[7].content == " world"

    assert result.status == TaskStatus.COMPLETED and result.ok and result.error is None
    assert result.result == "Hello world"
    assert result.session.opencode_id == "ses_scripted_1" and result.session.message_count == 1
    m = result.metrics
    assert (m.prompt_tokens, m.completion_tokens, m.cost, m.tool_calls) == (120, 30, 0.25, 1)
    assert m.stream_events == len(events)
    assert result.changes == [] and result.patch is None and result.workspace.git is None

    [request] = engine.requests
    assert request.prompt == "do the thing" and str(request.directory) == result.workspace.path
    assert request.session_id == "ses_scripted_1"


async def test_a_written_file_is_reported_in_a_plain_workspace(config, tmp_path):
    engine = ScriptedEngine(lambda request: [
        Tool("write", args={"filePath": "src/app.py"}), WriteFile("src/app.py", request.prompt + "\n"), "Written.",
    ])
    async with runner(config, engine) as r:
        first, _ = await run(r, make_task("t1", "print(1)"))
        second, events = await run(r, make_task("t2", "print(2)\nprint(3)"))

    assert first.changes == [FileChange(path="src/app.py", status="added", insertions=1, deletions=0)]
    assert second.changes == [FileChange(path="src/app.py", status="modified", insertions=2, deletions=1)]
    assert types(events)[0] == "workspace_reused"
    workspace = Path(second.workspace.path)
    assert (workspace / "src" / "app.py").read_text() == "print(2)\nprint(3)\n"
    assert workspace.parent == (tmp_path / "workspaces").resolve()
    assert second.patch == "output/t2/changes.patch"
    patch = (tmp_path / "data" / "files" / second.patch).read_text()
    assert "-print(1)" in patch and "+print(3)" in patch


async def test_changes_in_a_git_workspace_come_from_git(config, tmp_path):
    repo = tmp_path / "workspaces" / "repo"
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text("# Demo\n")
    (repo / "old.txt").write_text("bye\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    head = git(repo, "rev-parse", "HEAD")

    engine = ScriptedEngine([WriteFile("README.md", "# Demo\nMore.\n"), WriteFile("new.py", "x = 1\n"),
                             WriteFile("old.txt", None), "Edited."])
    async with runner(config, engine) as r:
        result, events = await run(r, make_task(workspace="repo"))
        [state] = await r.sessions()

    assert result.ok and types(events)[0] == "workspace_reused"
    assert sorted((c.path, c.status) for c in result.changes) == [
        ("README.md", "modified"), ("new.py", "added"), ("old.txt", "deleted"),
    ]
    assert (result.workspace.git.branch, result.workspace.git.commit, result.workspace.git.dirty) == (
        "main", head, True,
    )
    assert state.git.branch == "main" and state.git.last_commit == head


async def test_a_session_is_continued_unless_the_task_says_continue_false(config):
    engine = ScriptedEngine(["ok"])
    async with runner(config, engine) as r:
        first, _ = await run(r, make_task("t1"))
        second, events2 = await run(r, make_task("t2"))
        fresh, events3 = await run(r, make_task("t3", reuse=False))
        other, _ = await run(r, make_task("t4", session="s2"))
        sessions = {s.session_name: s for s in await r.sessions()}

    assert types(events2)[:2] == ["workspace_reused", "session_reused"]
    assert second.session.opencode_id == first.session.opencode_id == "ses_scripted_1"
    assert (first.session.message_count, second.session.message_count) == (1, 2)
    assert engine.requests[1].session_id == "ses_scripted_1"

    assert types(events3)[1] == "session_created"
    assert fresh.session.opencode_id == "ses_scripted_2" and fresh.session.message_count == 1
    assert other.session.opencode_id == "ses_scripted_3"

    assert sessions["s1"].opencode_id == "ses_scripted_2" and sessions["s1"].message_count == 1
    assert sessions["s1"].engine == "scripted" and sessions["s2"].message_count == 1


async def test_timeout_aborts_the_run_promptly(config):
    engine = ScriptedEngine(["working on it", Delay(30)])
    async with runner(config, engine) as r:
        started = time.monotonic()
        result, events = await run(r, make_task(timeout=100))
        elapsed = time.monotonic() - started

    assert elapsed < 1.0
    assert result.status == TaskStatus.TIMEOUT and result.error_type == ErrorType.TIMEOUT
    assert "timed out" in result.error
    assert result.result == "working on it"  # the partial reply is kept
    assert types(events) == ["workspace_created", "session_created", "prompt_sent", "text"]
    assert engine.aborts == [(Path(result.workspace.path), result.session.opencode_id)]
    assert result.session.message_count == 1


async def test_cancel_stops_a_running_task(config):
    engine = ScriptedEngine([Tool("bash", args={"command": "make"}, output="building"), Delay(30), "never said"])
    async with runner(config, engine) as r:
        assert r.cancel("t1") is False  # not running yet
        task = make_task("t1")
        started = time.monotonic()
        result, events = await run(r, task, lambda e: e.type == "tool_end" and r.cancel(task.task_id))
        elapsed = time.monotonic() - started
        assert r.cancel("t1") is False  # over

    assert elapsed < 1.0
    assert result.status == TaskStatus.CANCELLED and result.error_type == ErrorType.CANCELLED
    assert types(events)[-2:] == ["tool_start", "tool_end"]
    assert all("never said" not in (e.content or "") for e in events)
    assert len(engine.aborts) == 1


@pytest.mark.parametrize(("error_type", "expected"), [
    (None, ErrorType.ENGINE_ERROR),
    (ErrorType.PROVIDER_ERROR, ErrorType.PROVIDER_ERROR),
])
async def test_an_error_outcome_is_an_error_result_with_an_error_event(config, error_type, expected):
    engine = ScriptedEngine(["partial ", Fail("model overloaded", error_type), "never said"])
    async with runner(config, engine) as r:
        result, events = await run(r, make_task())

    assert result.status == TaskStatus.ERROR and result.error_type == expected
    assert result.error == "model overloaded" and result.result == "partial "
    assert types(events)[-2:] == ["text", "error"] and events[-1].content == "model overloaded"
    assert result.metrics.stream_events == len(events)
    assert result.session.message_count == 1 and result.changes == []


async def test_an_engine_failure_is_an_error_result_not_a_crash(config):
    engine = ScriptedEngine(lambda request: [Raise("server went away")] if "fail" in request.prompt else ["fine"])
    async with runner(config, engine) as r:
        failed, events = await run(r, make_task("t1", "please fail"))
        after, _ = await run(r, make_task("t2", "carry on"))

    assert failed.status == TaskStatus.ERROR and failed.error_type == ErrorType.ENGINE_ERROR
    assert failed.error == "server went away"
    assert types(events)[-2:] == ["prompt_sent", "error"] and events[-1].content == "server went away"
    assert after.ok and after.result == "fine" and after.session.opencode_id == failed.session.opencode_id


async def test_an_invalid_workspace_name_is_an_invalid_task(config, tmp_path):
    engine = ScriptedEngine(["unreachable"])
    async with runner(config, engine) as r:
        result, events = await run(r, make_task(workspace="../escape"))

    assert result.status == TaskStatus.ERROR and result.error_type == ErrorType.INVALID_TASK
    assert types(events) == ["error"]
    assert engine.requests == [] and not (tmp_path / "escape").exists()


async def test_registered_secrets_never_leave_in_events_or_results(config, tmp_path):
    engine = ScriptedEngine(lambda request: [
        Thinking(f"the key is {SECRET}"), f"Using {SECRET} now. ",
        Tool("bash", args={"command": f"login {SECRET}"}, output=f"logged in as {SECRET}"),
        WriteFile("creds.txt", f"token={SECRET}\n"),
        Fail(f"provider rejected {SECRET}", ErrorType.PROVIDER_ERROR) if "fail" in request.prompt else "Done.",
    ])
    async with runner(config, engine, Redactor([SECRET])) as r:
        ok, ok_events = await run(r, make_task("t1", f"use {SECRET}"))
        failed, failed_events = await run(r, make_task("t2", f"use {SECRET} and fail"))

    assert ok.ok and failed.error_type == ErrorType.PROVIDER_ERROR
    wire = b"".join(x.to_wire() for x in [ok, failed, *ok_events, *failed_events]).decode()
    assert SECRET not in wire and "***" in wire
    assert engine.requests[0].prompt == f"use {SECRET}"  # the engine itself gets the real prompt
    assert SECRET not in (tmp_path / "data" / "files" / ok.patch).read_text()


# ------------------------------------------------------------------- deadline, cancel, leases, retries


class Events(list):
    """Events published by a pipeline built directly (no runner), decoded."""

    async def publish(self, subject: str, data: bytes) -> None:
        self.append(StreamEvent.from_wire(data))


def build_pipeline(config, engine, *, artifacts=None, sessions=None, leases=None, lease_ttl: float = 30.0,
                   redactor: Redactor | None = None) -> tuple[TaskPipeline, Events]:
    data = config.data_dir
    events = Events()
    runtime = build_runtime(
        config, engine, publish=events.publish,
        sessions=sessions or FolderKeyValue(data / "sessions"), state=FolderKeyValue(data / "state"),
        artifacts=artifacts or FolderArtifacts(data / "files"), redactor=redactor or Redactor(),
        leases=leases, lease_ttl=lease_ttl,
    )
    return runtime.pipeline, events


class StuckArtifacts(FolderArtifacts):
    """An object store whose downloads hang (a slow workspace step) until ``release`` is set."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.finished = False

    async def get(self, name: str) -> bytes | None:
        self.started.set()
        try:
            await self.release.wait()
        finally:
            self.finished = True
        return b"data"


class WatchedLeases:
    """A lease store that says when someone was refused a lease (so is waiting for it)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.refused = asyncio.Event()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def create(self, key: str, value: bytes) -> int:
        try:
            return await self.inner.create(key, value)
        except RevisionMismatch:
            self.refused.set()
            raise


class Gate:
    """A script whose runs record their start and end; the run of prompt ``first`` waits in
    between until ``open`` is set."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.started = asyncio.Event()
        self.open = asyncio.Event()

    async def __call__(self, request):
        self.log.append(("start", request.prompt))
        if request.prompt == "first":
            self.started.set()
            await self.open.wait()
        self.log.append(("end", request.prompt))
        yield f"done {request.prompt}"


async def test_events_carry_the_attempt(config):
    pipeline, events = build_pipeline(config, ScriptedEngine(["ok"]))
    result = await pipeline.run(make_task(), asyncio.Event(), attempt=3)
    assert result.ok and events and {e.attempt for e in events} == {3}
    assert [e.seq for e in events] == list(range(1, len(events) + 1))

    async with runner(config, ScriptedEngine(["ok"])) as r:
        _, in_process = await run(r, make_task("t2"))
    assert {e.attempt for e in in_process} == {1}


@pytest.mark.parametrize("stop", ["cancel", "deadline"])
async def test_cancel_and_deadline_cover_a_slow_workspace_step(config, tmp_path, stop):
    artifacts = StuckArtifacts(tmp_path / "files")
    engine = ScriptedEngine(["unreachable"])
    pipeline, events = build_pipeline(config, engine, artifacts=artifacts)
    cancel = asyncio.Event()
    task = make_task(files=["input.txt"], timeout=100 if stop == "deadline" else None)

    running = asyncio.create_task(pipeline.run(task, cancel))
    await artifacts.started.wait()
    started = time.monotonic()
    if stop == "cancel":
        cancel.set()
    result = await running
    elapsed = time.monotonic() - started

    assert elapsed < 1.0 and artifacts.finished  # the download was stopped, not left running
    expected = TaskStatus.CANCELLED if stop == "cancel" else TaskStatus.TIMEOUT
    assert result.status == expected and result.error_type == expected.value
    assert types(events) == ["workspace_created"]  # the events so far are kept
    assert result.workspace.path is not None and result.metrics.stream_events == 1
    assert engine.requests == []

    after = await pipeline.run(make_task("t2"), asyncio.Event())  # the session lease was released
    assert after.ok


@pytest.mark.parametrize("stop", ["cancel", "deadline"])
async def test_cancel_and_deadline_cover_the_wait_for_the_session_lease(config, stop):
    gate = Gate()
    engine = ScriptedEngine(gate)
    watched = WatchedLeases(MemoryKeyValue())
    pipeline, events = build_pipeline(config, engine, leases=watched)

    first = asyncio.create_task(pipeline.run(make_task("t1", "first"), asyncio.Event()))
    await gate.started.wait()
    cancel = asyncio.Event()
    second = asyncio.create_task(
        pipeline.run(make_task("t2", "second", timeout=100 if stop == "deadline" else None), cancel)
    )
    await watched.refused.wait()  # the second task waits for the lease
    started = time.monotonic()
    if stop == "cancel":
        cancel.set()
    result = await second
    elapsed = time.monotonic() - started

    assert elapsed < 1.0
    expected = TaskStatus.CANCELLED if stop == "cancel" else TaskStatus.TIMEOUT
    assert result.status == expected and result.error_type == expected.value
    assert result.metrics.stream_events == 0 and result.workspace.path is None
    assert [e.task_id for e in events] == ["t1"] * len(events)  # the waiting task published nothing
    gate.open.set()
    assert (await first).ok
    assert gate.log == [("start", "first"), ("end", "first")]


async def test_two_runners_sharing_a_store_never_run_one_session_at_once(config, tmp_path):
    gate = Gate()
    shared = tmp_path / "leases"
    one = LocalRunner(config, engine=ScriptedEngine(gate), redactor=Redactor(),
                      leases=WatchedLeases(FolderKeyValue(shared)))
    two_leases = WatchedLeases(FolderKeyValue(shared))
    two = LocalRunner(config, engine=ScriptedEngine(gate), redactor=Redactor(), leases=two_leases)
    async with one, two:
        first = asyncio.create_task(one.run(make_task("t1", "first")))
        await gate.started.wait()
        second = asyncio.create_task(two.run(make_task("t2", "second")))
        await two_leases.refused.wait()  # the other runner waits for the session's lease...
        other = await two.run(make_task("t3", "other session", session="s2", workspace="ws2"))
        assert other.ok and not second.done()  # ...while other sessions run
        gate.open.set()
        results = await asyncio.gather(first, second)

    assert all(r.ok for r in results)
    assert gate.log == [
        ("start", "first"), ("start", "other session"), ("end", "other session"),
        ("end", "first"), ("start", "second"), ("end", "second"),
    ]


async def test_engine_unavailable_raises_retry_task_and_keeps_the_events(config):
    def script(request):
        raise EngineUnavailable("OpenCode is restarting", retry_after=7)

    engine = ScriptedEngine(script)
    pipeline, events = build_pipeline(config, engine)
    with pytest.raises(RetryTask) as raised:
        await pipeline.run(make_task(), asyncio.Event(), attempt=2)

    assert raised.value.retry_after == 7 and "OpenCode is restarting" in raised.value.message
    assert types(events) == ["workspace_created", "session_created", "prompt_sent"]  # no error event
    assert {e.attempt for e in events} == {2}
    engine.script = ["back"]
    assert (await pipeline.run(make_task("t2"), asyncio.Event())).ok  # the lease was released


async def test_an_unreachable_store_raises_retry_task(config):
    class TimingOutSessions(FolderKeyValue):
        async def get(self, key: str) -> bytes | None:
            raise nats.errors.TimeoutError

    pipeline, _ = build_pipeline(config, ScriptedEngine(["ok"]),
                                 sessions=TimingOutSessions(config.data_dir / "sessions"))
    with pytest.raises(RetryTask, match="NATS unavailable"):
        await pipeline.run(make_task(), asyncio.Event())


async def test_a_lost_lease_stops_the_task_for_a_retry(config):
    class Stolen(WatchedLeases):
        async def update(self, key: str, value: bytes, revision: int) -> int:
            current = await self.inner.entry(key)  # another sidecar took the lease over
            await self.inner.update(key, b'{"owner": "thief"}', current[1])
            raise RevisionMismatch("taken over")

    engine = ScriptedEngine(["working", Delay()])
    pipeline, events = build_pipeline(config, engine, leases=Stolen(MemoryKeyValue()), lease_ttl=0.05)
    with pytest.raises(RetryTask, match="lease was lost"):
        await pipeline.run(make_task(), asyncio.Event())
    assert len(engine.aborts) == 1  # the agent was stopped
    assert types(events)[-1] == "text"


async def test_the_in_process_runner_retries_with_the_next_attempt(config):
    calls = []

    def script(request):
        calls.append(request.prompt)
        if len(calls) < 3:
            raise EngineUnavailable("OpenCode is restarting", retry_after=0.01)
        return ["finally"]

    async with runner(config, ScriptedEngine(script)) as r:
        result, events = await run(r, make_task())
    assert result.ok and result.result == "finally" and len(calls) == 3
    assert [(e.attempt, e.seq) for e in events if e.type == "prompt_sent"] == [(1, 3), (2, 3), (3, 3)]
    assert result.metrics.stream_events == len([e for e in events if e.attempt == 3])


async def test_the_in_process_runner_gives_up_with_an_error_result(config):
    def script(request):
        raise EngineUnavailable("OpenCode is down", retry_after=0.01)

    async with LocalRunner(config, engine=ScriptedEngine(script), redactor=Redactor(), attempts=2) as r:
        result, events = await run(r, make_task())
    assert result.status == TaskStatus.ERROR and result.error_type == ErrorType.ENGINE_ERROR
    assert "OpenCode is down" in result.error and "gave up after 2 runs" in result.error
    assert result.session.name == "s1" and result.workspace.name == "ws"
    assert {e.attempt for e in events} == {1, 2}


async def test_cancel_during_the_retry_delay_is_a_cancelled_result(config):
    def script(request):
        raise EngineUnavailable("OpenCode is down", retry_after=30)

    async with runner(config, ScriptedEngine(script)) as r:
        started = time.monotonic()
        result, _ = await run(r, make_task(), lambda e: e.type == "prompt_sent" and r.cancel("t1"))
    assert result.status == TaskStatus.CANCELLED and time.monotonic() - started < 1.0


@pytest.mark.parametrize("kind", ["text", "thinking"])
async def test_a_secret_split_across_deltas_never_reaches_a_consumer_that_joins_them(config, kind):
    step = Text if kind == "text" else Thinking
    # Every delta flushed on its own: the secret straddles the flush boundaries, even across a tool.
    config = config.model_copy(update={"text_flush_interval": 0})
    engine = ScriptedEngine([
        step("the key is hunt"), step("er2-very-"), Tool("bash", output="ok"), step("secret-value, keep it"),
    ])
    async with runner(config, engine, Redactor([SECRET])) as r:
        result, events = await run(r, make_task())

    joined = "".join(e.content or "" for e in events if e.type == kind)
    assert SECRET not in joined and "hunt" not in joined
    assert joined == f"the key is {MASK}, keep it"
    wire = b"".join(e.to_wire() for e in events).decode()
    assert "hunter2" not in wire and SECRET not in result.to_wire().decode()


async def test_nats_unreachable_after_the_prompt_costs_the_patch_not_a_second_run(config, caplog):
    class TimingOutUploads(FolderArtifacts):
        async def put(self, name: str, data: bytes) -> None:
            raise nats.errors.TimeoutError

    engine = ScriptedEngine([WriteFile("a.txt", "x\n"), "written"])
    pipeline, _ = build_pipeline(config, engine, artifacts=TimingOutUploads(config.data_dir / "files"))
    result = await pipeline.run(make_task(), asyncio.Event())
    assert result.ok and result.patch is None and [c.path for c in result.changes] == ["a.txt"]
    assert len(engine.requests) == 1
    assert "storing the patch failed, NATS unavailable" in caplog.text


async def test_held_text_is_published_before_the_error_event(config):
    config = config.model_copy(update={"text_flush_interval": 0})
    engine = ScriptedEngine(["partial hunt", Fail("model overloaded")])
    async with runner(config, engine, Redactor([SECRET])) as r:
        result, events = await run(r, make_task())
    assert [(e.type, e.content) for e in events[-3:]] == [
        ("text", "partial "), ("text", "hunt"), ("error", "model overloaded"),
    ]
    assert result.metrics.stream_events == len(events)
