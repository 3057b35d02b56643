"""The TaskHandle's own logic, fed by hand through its subscription callbacks (no NATS): attempts,
duplicates, the end of iteration after late events, the bounded buffer, and "not found" vs "not yet".
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from ocbridge.client.handle import TaskHandle, TaskNotFound, TaskState
from ocbridge.client.protocol import TaskRecord, TaskResult
from ocbridge.client.render import render_attempt, render_result

TASK = "task-1"


class StubMsg:
    def __init__(self, payload: dict[str, Any] | bytes) -> None:
        self.data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()


class StubSub:
    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.pending_msgs = 0
        self.unsubscribed = False

    async def unsubscribe(self) -> None:
        self.unsubscribed = True


class StubNats:
    def __init__(self) -> None:
        self.subs: dict[str, StubSub] = {}

    async def subscribe(self, subject: str, cb=None) -> StubSub:
        self.subs[subject] = StubSub(subject)
        return self.subs[subject]


class StubClient:
    """What a handle asks of its client: a connection, spilled fields, the record, the queue."""

    def __init__(self) -> None:
        self.nc = StubNats()
        self.record: TaskRecord | None = None
        self.queued: bool | None = True
        self.lookups = 0

    async def unspill(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    async def task_record(self, task_id: str) -> TaskRecord | None:
        self.lookups += 1
        return self.record

    async def is_queued(self, task_id: str, where=None) -> bool | None:
        return self.queued


def event(seq: int, attempt: int | None = None, **extra: Any) -> dict[str, Any]:
    body = {"taskID": TASK, "seq": seq, "timestamp": "2026-01-02T10:11:12.345Z", "type": "text",
            "content": f"e{seq}", **extra}
    if attempt is not None:
        body["attempt"] = attempt
    return body


def result(stream_events: int, **extra: Any) -> dict[str, Any]:
    return {"taskID": TASK, "status": "completed", "result": "ok",
            "metrics": {"streamEvents": stream_events}, **extra}


async def new_handle(*, events: bool = True, **options: Any) -> tuple[TaskHandle, StubClient]:
    client = StubClient()
    options.setdefault("presence_interval", None)
    handle = TaskHandle(client, TASK, f"s.{TASK}", f"r.{TASK}", **options)  # type: ignore[arg-type]
    await handle._subscribe(events=events)
    return handle, client


async def feed(handle: TaskHandle, *events: dict[str, Any]) -> None:
    for body in events:
        await handle._on_event(StubMsg(body))


async def collect(handle: TaskHandle, timeout: float = 5) -> list[tuple[int | None, int]]:
    return [(e.attempt, e.seq) async for e in handle.events(timeout=timeout)]


async def test_events_come_in_order_once_and_iteration_ends_with_the_result():
    handle, _ = await new_handle()
    await feed(handle, event(1, 1), event(2, 1), event(2, 1), event(1, 1), event(3, 1))
    await handle._on_result(StubMsg(result(3)))
    assert await collect(handle) == [(1, 1), (1, 2), (1, 3)]
    assert handle.ignored_events == 2
    assert (await handle.result(timeout=1)).status == "completed" and handle.done


async def test_a_new_attempt_supersedes_the_old_one_and_is_visible():
    handle, _ = await new_handle()
    await feed(handle, event(1, 1), event(2, 1))
    seen = []
    async for e in handle:
        seen.append((e.attempt, e.seq))
        if e.seq == 2 and e.attempt == 1:
            # The sidecar died; the task runs again: seq restarts at 1, older stragglers are stale.
            await feed(handle, event(1, 2), event(3, 1), event(2, 2), event(2, 1))
            await handle._on_result(StubMsg(result(2)))
    assert seen == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert handle.attempt == 2 and handle.ignored_events == 2


async def test_unread_events_of_an_older_attempt_are_dropped_when_a_newer_begins():
    handle, _ = await new_handle()
    await feed(handle, event(1, 1), event(2, 1), event(3, 1), event(1, 2))
    await handle._on_result(StubMsg(result(1)))
    assert await collect(handle) == [(2, 1)]


async def test_station_era_events_without_attempt_count_a_seq_restart_as_a_new_attempt():
    handle, _ = await new_handle()
    await feed(handle, event(1), event(2), event(2), event(1), event(2))
    await handle._on_result(StubMsg(result(2)))
    assert await collect(handle) == [(2, 1), (2, 2)]
    handle, _ = await new_handle()
    await feed(handle, event(1), event(2))
    await handle._on_result(StubMsg(result(2)))
    assert await collect(handle) == [(1, 1), (1, 2)]  # attempt filled in as 1


async def test_iteration_waits_for_the_events_the_result_reports():
    handle, _ = await new_handle(late_event_grace=5)
    await feed(handle, event(1, 1))
    await handle._on_result(StubMsg(result(3)))  # processed before the last two events (B9)
    assert handle.done

    async def late() -> None:
        await asyncio.sleep(0.2)
        await feed(handle, event(2, 1), event(3, 1))

    feeder = asyncio.create_task(late())
    assert await collect(handle) == [(1, 1), (1, 2), (1, 3)]
    await feeder


async def test_events_that_never_come_are_waited_for_a_bounded_time():
    handle, _ = await new_handle(late_event_grace=0.2)
    await feed(handle, event(1, 1))
    await handle._on_result(StubMsg(result(5)))
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await collect(handle) == [(1, 1)]
    assert 0.15 <= loop.time() - start < 2


async def test_events_still_queued_on_the_subscription_are_waited_for():
    """The result of attempt 2 can be processed while attempt 2's events still wait in the
    subscription's queue; the seq count of attempt 1 must not end the iteration early."""
    handle, client = await new_handle(late_event_grace=5)
    await feed(handle, event(1, 1), event(2, 1), event(3, 1))
    sub = client.nc.subs[f"s.{TASK}"]
    sub.pending_msgs = 2
    await handle._on_result(StubMsg(result(2)))
    await asyncio.sleep(0.05)
    assert not handle._finished
    sub.pending_msgs = 1
    await feed(handle, event(1, 2))
    sub.pending_msgs = 0
    await feed(handle, event(2, 2))
    assert handle._finished
    assert await collect(handle, timeout=0.5) == [(2, 1), (2, 2)]


async def test_the_buffer_is_bounded_and_drops_the_oldest_unread_events():
    handle, _ = await new_handle(max_buffered_events=10)
    await feed(handle, *(event(seq, 1) for seq in range(1, 101)))
    await handle._on_result(StubMsg(result(100)))
    assert len(handle._buffer) == 10 and handle.dropped_events == 90
    assert [seq for _, seq in await collect(handle)] == list(range(91, 101))


async def test_the_buffer_is_bounded_in_bytes_too():
    handle, _ = await new_handle(max_buffered_bytes=2000)
    await feed(handle, *(event(seq, 1, content="x" * 500) for seq in range(1, 21)))
    assert handle._buffered_bytes <= 2000 and handle.dropped_events > 10


async def test_a_handle_without_events_ends_on_its_result_and_subscribes_when_iterated():
    handle, client = await new_handle(events=False)
    assert f"s.{TASK}" not in client.nc.subs
    await handle._on_result(StubMsg(result(7)))
    assert handle._finished and await collect(handle) == []
    late, client = await new_handle(events=False)
    iteration = asyncio.create_task(collect(late))
    await asyncio.sleep(0.01)
    assert f"s.{TASK}" in client.nc.subs
    await feed(late, event(1, 1))
    await late._on_result(StubMsg(result(1)))
    assert await iteration == [(1, 1)]


async def test_the_subscriptions_close_once_the_result_and_its_events_are_in():
    handle, client = await new_handle()
    await feed(handle, event(1, 1))
    await handle._on_result(StubMsg(result(1)))
    await asyncio.sleep(0)
    assert all(sub.unsubscribed for sub in client.nc.subs.values())


async def test_malformed_foreign_and_second_results_are_ignored():
    handle, _ = await new_handle()
    await handle._on_event(StubMsg(b"not json"))
    await handle._on_event(StubMsg({**event(1, 1), "taskID": "other"}))
    await handle._on_result(StubMsg(b"[1, 2]"))
    await handle._on_result(StubMsg({**result(0), "taskID": "other"}))
    assert not handle.done
    await handle._on_result(StubMsg(result(0, result="first")))
    await handle._on_result(StubMsg(result(0, result="second")))
    assert (await handle.result(timeout=1)).result == "first"


async def test_iteration_timeout_says_what_did_not_come():
    handle, _ = await new_handle()
    with pytest.raises(TimeoutError, match=rf"task {TASK}: no result within 0\.1s"):
        await collect(handle, timeout=0.1)
    with pytest.raises(TimeoutError, match=r"no result within 0\.1s"):
        await handle.result(timeout=0.1)


async def test_status_tells_queued_running_complete_not_found_and_unknown():
    handle, client = await new_handle()
    assert await handle.status() is TaskState.QUEUED
    client.record = TaskRecord(taskID=TASK, state="running", attempt=1)
    assert await handle.status() is TaskState.RUNNING
    assert (await handle.info()).attempt == 1
    client.record = TaskRecord(taskID=TASK, state="retrying", attempt=1)
    assert await handle.status() is TaskState.RETRYING
    client.record, client.queued = None, None
    assert await handle.status() is TaskState.UNKNOWN
    client.queued = False
    assert await handle.status() is TaskState.NOT_FOUND
    with pytest.raises(TaskNotFound, match="not queued and has no record"):
        await handle.result(timeout=1)

    handle, client = await new_handle()
    client.record = TaskRecord(taskID=TASK, state="done", result=TaskResult.model_validate(result(0)))
    assert await handle.status() is TaskState.COMPLETE
    assert handle.done and (await handle.result(timeout=1)).ok


async def test_a_task_that_vanishes_ends_waiters_instead_of_waiting_for_ever():
    handle, client = await new_handle(presence_interval=0.05)
    client.queued = False
    with pytest.raises(TaskNotFound):
        await collect(handle, timeout=5)
    with pytest.raises(TaskNotFound):
        await handle.result(timeout=5)
    assert not handle.done


async def test_a_queued_task_is_not_reported_missing():
    handle, client = await new_handle(presence_interval=0.05)
    with pytest.raises(TimeoutError):
        await handle.result(timeout=0.3)
    assert client.lookups >= 2
    await handle.close()


async def test_a_result_missed_in_transit_is_taken_from_the_record():
    handle, client = await new_handle(presence_interval=0.05)
    await feed(handle, event(1, 1))
    client.record = TaskRecord(taskID=TASK, state="done", result=TaskResult.model_validate(result(4)))
    assert await collect(handle) == [(1, 1)]  # a recorded result ends the iteration at once
    assert (await handle.result(timeout=1)).ok


async def test_closing_early_ends_iteration():
    handle, _ = await new_handle()
    await feed(handle, event(1, 1))
    iteration = asyncio.create_task(collect(handle))
    await asyncio.sleep(0.01)
    await handle.close()
    assert await iteration == [(1, 1)]


def test_rendering_shows_attempts_and_fields_that_could_not_be_read_back():
    assert "attempt 2" in render_attempt(2)
    shown = render_result(TaskResult.model_validate(result(0, spilled={"changes": "output/t/changes.json"})))
    assert "changes: not available (object output/t/changes.json" in shown
