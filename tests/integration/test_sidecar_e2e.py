"""End to end: Station-format tasks on NATS -> sidecar -> real OpenCode -> live events -> one result."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from ocbridge.client.protocol import StreamEvent, TaskResult
from support.stack import settled

pytestmark = [pytest.mark.opencode, pytest.mark.slow]

STATION_ORDER = ["workspace_created", "session_created", "prompt_sent"]


def station_task(naming, prompt: str, *, workspace: str, session: str, cont: bool = True, timeout_ms=None):
    task_id = str(uuid.uuid4())
    task = {
        "taskID": task_id,
        "session": {"name": session, "continue": cont},
        "workspace": {"name": workspace},
        "prompt": prompt,
        "callback": {
            "streamSubject": naming.stream_subject(task_id),
            "resultSubject": naming.result_subject(task_id),
        },
    }
    if timeout_ms:
        task["timeout"] = timeout_ms
    return task


class StationListener:
    """What Station does: subscribe to both callback subjects, then publish with core NATS."""

    def __init__(self, client, task: dict) -> None:
        self.client = client
        self.nc = client.nc
        self.task = task
        self.events: list[tuple[float, StreamEvent]] = []
        self.results: list[TaskResult] = []
        self.done = asyncio.Event()

    async def publish(self, subject: str) -> None:
        loop = asyncio.get_running_loop()

        async def on_event(msg):
            self.events.append((loop.time(), StreamEvent.from_wire(msg.data)))

        async def on_result(msg):
            self.results.append(TaskResult.from_wire(msg.data))
            self.done.set()

        self.subs = [
            await self.nc.subscribe(self.task["callback"]["streamSubject"], cb=on_event),
            await self.nc.subscribe(self.task["callback"]["resultSubject"], cb=on_result),
        ]
        await self.nc.publish(subject, json.dumps(self.task).encode())
        await self.nc.flush()

    async def wait(self, timeout: float = 60) -> TaskResult:
        await asyncio.wait_for(self.done.wait(), timeout)
        await settled(self.client, self.task["taskID"])  # a second result would have arrived by now
        for sub in self.subs:
            await sub.unsubscribe()
        return self.results[0]


async def test_station_task_creates_file_with_live_ordered_events_and_one_result(stack):
    sidecar, client = stack
    naming = client.naming
    task = station_task(naming, "create hello.txt with content Hello World", workspace="ws-hello", session="s-hello")
    listener = StationListener(client, task)
    await listener.publish(naming.task_subject)
    result = await listener.wait()

    assert len(listener.results) == 1
    workspace = Path(sidecar.config.workspace_root).resolve() / "ws-hello"
    assert (workspace / "hello.txt").read_text() == "Hello World"

    events = [e for _, e in listener.events]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    types = [e.type for e in events]
    assert types[:3] == STATION_ORDER, types
    assert "tool_start" in types, types
    assert types.index("tool_start") < types.index("tool_end") < max(i for i, t in enumerate(types) if t == "text")
    tool_end = next(e for e in events if e.type == "tool_end")
    assert tool_end.tool.name == "write" and tool_end.tool.duration is not None and tool_end.tool.duration >= 0
    assert events[0].content == str(workspace)

    assert result.status == "completed"
    assert result.task_id == task["taskID"]
    assert result.session.name == "s-hello" and result.session.opencode_id.startswith("ses_")
    assert result.session.message_count == 1
    assert result.workspace.path == str(workspace)
    assert result.metrics.prompt_tokens > 0 and result.metrics.completion_tokens > 0
    assert result.metrics.tool_calls == 1
    assert result.metrics.stream_events == events[-1].seq
    assert "hello.txt" in result.result

    # Events were live: the tool events arrived before the result, not replayed at the end.
    state = await client.get_session("s-hello")
    assert state.opencode_id == result.session.opencode_id and state.message_count == 1


async def test_second_task_continues_the_session(stack):
    _, client = stack
    first = await client.run("create notes.txt with content first", workspace="ws-cont", session="s-cont", wait=60)
    assert first.status == "completed"
    handle = await client.submit("recall", workspace="ws-cont", session="s-cont")
    events = [e async for e in handle.events(timeout=60)]
    second = await handle.result(timeout=5)
    assert second.status == "completed"
    assert second.session.opencode_id == first.session.opencode_id
    assert second.session.message_count == 2
    assert "create notes.txt with content first" in second.result
    assert events[1].type == "session_reused"
    assert events[0].type == "workspace_reused"


async def test_continue_false_starts_a_new_session(stack):
    _, client = stack
    first = await client.run("hello there", workspace="ws-new", session="s-new", wait=60)
    second = await client.run("hello again", workspace="ws-new", session="s-new", continue_session=False, wait=60)
    assert second.status == "completed"
    assert second.session.opencode_id != first.session.opencode_id
    assert second.session.message_count == 1


async def test_stale_session_id_in_kv_is_replaced(stack):
    _, client = stack
    first = await client.run("hi", workspace="ws-stale", session="s-stale", wait=60)
    state = await client.get_session("s-stale")
    state.opencode_id = "ses_doesnotexist000000000000"
    kv = await client._bucket(client.naming.sessions_bucket)
    await kv.put("s-stale", state.to_wire())
    second = await client.run("hi again", workspace="ws-stale", session="s-stale", wait=60)
    assert second.status == "completed"
    assert second.session.opencode_id not in ("ses_doesnotexist000000000000", None)
    assert second.session.opencode_id != first.session.opencode_id
    assert (await client.get_session("s-stale")).opencode_id == second.session.opencode_id


async def test_timeout_aborts_the_agent(stack):
    _, client = stack
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await client.run("slow 30", workspace="ws-timeout", session="s-timeout", timeout=2, wait=60)
    elapsed = loop.time() - started
    assert result.status == "timeout"
    assert result.error_type == "timeout"
    assert elapsed < 15
    # The session is usable again straight away: the agent really stopped.
    after = await client.run("hello", workspace="ws-timeout", session="s-timeout", wait=60)
    assert after.status == "completed"


async def test_cancel_stops_a_running_task(stack):
    _, client = stack
    handle = await client.submit("slow 30", workspace="ws-cancel", session="s-cancel")
    loop = asyncio.get_running_loop()
    async for event in handle.events(timeout=60):
        if event.type == "text":  # the slow answer is streaming: cancel it mid-way
            cancelled_at = loop.time()
            await handle.cancel("test")
            break
    result = await handle.result(timeout=30)
    assert result.status == "cancelled"
    assert loop.time() - cancelled_at < 10


async def test_cancel_before_start_never_runs_the_task(stack):
    _, client = stack
    task = client.build_task("create never.txt with content x", workspace="ws-precancel", session="s-pre")
    await client.cancel(task.task_id)
    result = await client.run(task, wait=30)
    assert result.status == "cancelled"
    assert not (Path(stack[0].config.workspace_root).resolve() / "ws-precancel" / "never.txt").exists()


async def test_thinking_and_text_are_streamed(stack):
    _, client = stack
    handle = await client.submit("think about the plan\ncreate plan.txt with content p", workspace="ws-think",
                                 session="s-think")
    events = [e async for e in handle.events(timeout=60)]
    result = await handle.result(timeout=5)
    assert result.status == "completed"
    types = [e.type for e in events]
    assert "thinking" in types and "text" in types


async def test_provider_error_becomes_error_result(stack):
    _, client = stack
    handle = await client.submit("fail 400", workspace="ws-fail", session="s-fail")
    events = [e async for e in handle.events(timeout=60)]
    result = await handle.result(timeout=5)
    assert result.status == "error"
    assert result.error_type == "provider_error"
    assert events[-1].type == "error"
    assert result.metrics.stream_events == events[-1].seq


@pytest.mark.parametrize(
    ("payload", "expect_result"),
    [
        (b"{not json", False),
        (b'["a list"]', False),
        (json.dumps({"taskID": "x", "prompt": "p"}).encode(), False),
        ("missing-fields", True),
        ("escape", True),
        ("absolute-escape", True),
    ],
)
async def test_bad_tasks_get_an_error_result_or_dead_letter_and_the_sidecar_goes_on(stack, payload, expect_result):
    _sidecar, client = stack
    naming = client.naming
    task_id = str(uuid.uuid4())
    result_subject = naming.result_subject(task_id)
    if payload == "missing-fields":
        payload = json.dumps({"taskID": task_id, "callback": {"resultSubject": result_subject,
                                                              "streamSubject": naming.stream_subject(task_id)}})
    elif payload in ("escape", "absolute-escape"):
        name = "../../etc" if payload == "escape" else "/tmp/../../root"
        task = station_task(naming, "create pwned.txt with content x", workspace=name, session="s-esc")
        task["taskID"] = task_id
        task["callback"] = {"streamSubject": naming.stream_subject(task_id), "resultSubject": result_subject}
        payload = json.dumps(task)
    results = []

    async def on_result(msg):
        results.append(TaskResult.from_wire(msg.data))

    sub = await client.nc.subscribe(result_subject, cb=on_result)
    js = client.nc.jetstream()
    dead_before = (await js.stream_info(naming.dead_letter_stream)).state.messages
    await client.nc.publish(naming.task_subject, payload if isinstance(payload, bytes) else payload.encode())
    # The sidecar keeps serving: a good task right after completes.
    good = await client.run("hello", workspace="ws-after-bad", session=f"s-after-{task_id[:6]}", wait=60)
    assert good.status == "completed"
    # Every message handled (a result is published before its message is acked): then look.
    for _ in range(400):
        info = await js.consumer_info(naming.stream_name, naming.consumer_name)
        if info.num_ack_pending == 0 and info.num_pending == 0:
            break
        await asyncio.sleep(0.05)
    await client.nc.flush()
    await asyncio.sleep(0)
    await sub.unsubscribe()
    if expect_result:
        assert len(results) == 1
        assert results[0].status == "error"
        assert results[0].error_type == "invalid_task"
    else:
        assert (await js.stream_info(naming.dead_letter_stream)).state.messages == dead_before + 1
    info = await js.consumer_info(naming.stream_name, naming.consumer_name)
    assert info.num_ack_pending == 0 and info.num_redelivered == 0
    assert not list(Path("/etc").glob("pwned.txt"))


async def test_opencode_killed_while_idle_is_restarted(stack):
    sidecar, client = stack
    engine = sidecar.engine
    old_pid = engine.process.pid
    assert old_pid
    import os
    import signal

    os.kill(old_pid, signal.SIGKILL)
    result = await client.run("create again.txt with content back", workspace="ws-restart", session="s-restart",
                              wait=90)
    assert result.status == "completed"
    assert engine.process.pid not in (None, old_pid)
