"""The client's TaskHandle against a real nats-server, with the test playing the sidecar by hand:
attempts and duplicates, late events, bounded buffering, "not found" vs "not yet", and cancel keys
that expire."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import nats
import pytest

from ocbridge.client.client import CodingClient
from ocbridge.client.handle import TaskNotFound, TaskState
from ocbridge.client.protocol import TaskRecord, TaskResult, cancel_key, record_key
from support.stack import unique_naming


@pytest.fixture
async def client(nats_server):
    client = await CodingClient.connect(nats_server.url, naming=unique_naming(), late_event_grace=5)
    yield client
    await client.close()


@pytest.fixture
async def sidecar_nc(nats_server):
    """A second connection, publishing what a sidecar would."""
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


def event(task_id: str, seq: int, attempt: int | None, **extra: Any) -> bytes:
    body = {"taskID": task_id, "seq": seq, "timestamp": "2026-01-02T10:11:12.345Z", "type": "text",
            "content": f"event {seq}", **extra}
    if attempt is not None:
        body["attempt"] = attempt
    return json.dumps(body).encode()


def result(task_id: str, stream_events: int, **extra: Any) -> bytes:
    return json.dumps({"taskID": task_id, "status": "completed", "result": "done",
                       "metrics": {"streamEvents": stream_events}, **extra}).encode()


async def publish(nc, subject: str, *payloads: bytes) -> None:
    for payload in payloads:
        await nc.publish(subject, payload)
    await nc.flush()


async def test_duplicates_and_a_second_attempt_are_filtered(client, sidecar_nc):
    handle = await client.submit("hello", workspace="ws")
    tid, events = handle.task_id, handle.stream_subject
    await publish(sidecar_nc, events, event(tid, 1, 1), event(tid, 2, 1), event(tid, 2, 1), event(tid, 3, 1))
    seen = []
    async for ev in handle.events(timeout=10):
        seen.append((ev.attempt, ev.seq))
        if (ev.attempt, ev.seq) == (1, 3):
            # Redelivered: a second attempt starts over at seq 1; stale and repeated events follow.
            await publish(sidecar_nc, events, event(tid, 1, 2), event(tid, 4, 1), event(tid, 1, 2),
                          event(tid, 2, 2), event(tid, 3, 2))
            await publish(sidecar_nc, handle.result_subject, result(tid, 3))
    assert seen == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert handle.attempt == 2 and handle.ignored_events == 3
    assert (await handle.result(timeout=1)).ok


async def test_station_era_events_are_told_apart_by_their_seq_restart(client, sidecar_nc):
    handle = await client.submit("hello", workspace="ws")
    tid = handle.task_id
    await publish(sidecar_nc, handle.stream_subject, event(tid, 1, None), event(tid, 2, None), event(tid, 1, None))
    await publish(sidecar_nc, handle.result_subject, result(tid, 1))
    assert [(e.attempt, e.seq) async for e in handle.events(timeout=10)] == [(2, 1)]


async def test_a_result_published_before_its_events_waits_for_them(client, sidecar_nc):
    handle = await client.submit("hello", workspace="ws")
    tid = handle.task_id
    await publish(sidecar_nc, handle.stream_subject, event(tid, 1, 1))
    await publish(sidecar_nc, handle.result_subject, result(tid, 3))

    async def late() -> None:
        await asyncio.sleep(0.3)
        await publish(sidecar_nc, handle.stream_subject, event(tid, 2, 1), event(tid, 3, 1))

    feeder = asyncio.create_task(late())
    assert [e.seq async for e in handle.events(timeout=10)] == [1, 2, 3]
    await feeder


async def test_a_thousand_events_then_the_result_all_arrive_in_order(client, sidecar_nc):
    """Events and result on two subscriptions: the result can be processed first (B9)."""
    handle = await client.submit("hello", workspace="ws")
    tid = handle.task_id
    await publish(sidecar_nc, handle.stream_subject, *(event(tid, seq, 1) for seq in range(1, 1001)))
    await publish(sidecar_nc, handle.result_subject, result(tid, 1000))
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert [e.seq async for e in handle.events(timeout=10)] == list(range(1, 1001))
    assert loop.time() - start < 4  # did not sit out the 5 s grace


async def test_run_does_not_follow_events_and_an_unread_handle_stays_bounded(nats_server, sidecar_nc, monkeypatch):
    client = await CodingClient.connect(nats_server.url, naming=unique_naming(), max_buffered_events=50)
    try:
        subscribed: list[str] = []
        result_followed = asyncio.Event()
        original = client.nc.subscribe

        async def spy(subject, *args, **kwargs):
            subscribed.append(subject)
            sub = await original(subject, *args, **kwargs)
            if subject == task.callback.result_subject:
                result_followed.set()
            return sub

        monkeypatch.setattr(client.nc, "subscribe", spy)
        task = client.build_task("hello", workspace="ws")
        run = asyncio.create_task(client.run(task, wait=10))
        await asyncio.wait_for(result_followed.wait(), 5)
        await asyncio.sleep(0.2)  # subscribed on the server and the task published
        await publish(sidecar_nc, task.callback.stream_subject, *(event(task.task_id, s, 1) for s in range(1, 501)))
        await publish(sidecar_nc, task.callback.result_subject, result(task.task_id, 500))
        assert (await run).ok
        assert [s for s in subscribed if not s.startswith("_INBOX.")] == [task.callback.result_subject]

        # A handle that follows events but is never read keeps the newest 50.
        handle = await client.submit("hello", workspace="ws")
        tid = handle.task_id
        big = (event(tid, s, 1, content="x" * 1000) for s in range(1, 2001))
        await publish(sidecar_nc, handle.stream_subject, *big)
        await publish(sidecar_nc, handle.result_subject, result(tid, 2000))
        assert (await handle.result(timeout=10)).ok
        for _ in range(100):
            if handle._finished:
                break
            await asyncio.sleep(0.05)
        assert len(handle._buffer) == 50 and handle.dropped_events == 1950
        assert [e.seq async for e in handle.events(timeout=5)] == list(range(1951, 2001))
    finally:
        await client.close()


async def test_watch_tells_not_found_from_not_yet(client, sidecar_nc):
    # Nothing ever submitted on this naming: no stream, no bucket.
    with pytest.raises(TaskNotFound, match="not queued and has no record"):
        await client.watch(str(uuid.uuid4()))

    queued = await client.submit("hello", workspace="ws")
    assert await queued.status() is TaskState.QUEUED
    with pytest.raises(TaskNotFound):
        await client.watch(str(uuid.uuid4()))

    # A task published the way Station does (core NATS, no message id) is found in the stream.
    station_task = client.build_task("hello", workspace="ws")
    await publish(sidecar_nc, client.naming.task_subject, station_task.to_wire())
    await asyncio.sleep(0.1)
    watched = await client.watch(station_task.task_id)
    assert await watched.status() is TaskState.QUEUED
    await watched.close()

    # A running task has a record; a finished one has its result there.
    tasks = await client._js.create_key_value(bucket=client.naming.tasks_bucket)
    await tasks.put(record_key(queued.task_id), TaskRecord(taskID=queued.task_id, state="running").to_wire())
    assert await queued.status() is TaskState.RUNNING
    decided = TaskResult.model_validate_json(result(queued.task_id, 0))
    done = TaskRecord(taskID=queued.task_id, state="done", result=decided)
    await tasks.put(record_key(queued.task_id), done.to_wire())
    late = await client.watch(queued.task_id)
    assert late.done and (await late.result(timeout=1)).ok
    assert [e async for e in late.events(timeout=1)] == []


async def test_a_handle_whose_task_vanishes_stops_waiting(nats_server):
    client = await CodingClient.connect(nats_server.url, naming=unique_naming(), presence_interval=0.2)
    try:
        handle = await client.submit("hello", workspace="ws")
        stream, seq = handle._queued_at
        # Gone from the stream with no record (purged, expired): never going to run.
        await client._js.delete_msg(stream, seq)
        with pytest.raises(TaskNotFound):
            await handle.result(timeout=10)
    finally:
        await client.close()


async def test_cancel_keys_expire(nats_server):
    client = await CodingClient.connect(nats_server.url, naming=unique_naming(), cancel_ttl=1)
    try:
        js, naming = client._js, client.naming
        # A bucket without a TTL (as nats-py creates it, message TTLs allowed): the key expires alone.
        state = await js.create_key_value(bucket=naming.state_bucket)
        await client.cancel("queued-1", reason="test")
        assert json.loads((await state.get(cancel_key("queued-1"))).value)["taskID"] == "queued-1"
        for _ in range(50):
            await asyncio.sleep(0.1)
            if await _absent(state, cancel_key("queued-1")):
                break
        assert await _absent(state, cancel_key("queued-1"))

        # A task whose result is decided is not cancelled in KV: nobody would ever remove the key.
        tasks = await js.create_key_value(bucket=naming.tasks_bucket)
        done = TaskRecord(taskID="done-1", state="done", result=TaskResult.model_validate_json(result("done-1", 0)))
        await tasks.put(record_key("done-1"), done.to_wire())
        await client.cancel("done-1")
        assert await _absent(state, cancel_key("done-1"))
    finally:
        await client.close()

    # A bucket with its own TTL (Station's): a plain put, which the bucket expires.
    client = await CodingClient.connect(nats_server.url, naming=unique_naming())
    try:
        state = await client._js.create_key_value(bucket=client.naming.state_bucket, ttl=3600)
        await client.cancel("queued-2")
        stored = await client._js.get_msg(f"KV_{client.naming.state_bucket}",
                                          subject=f"$KV.{client.naming.state_bucket}.{cancel_key('queued-2')}")
        assert not (stored.headers or {}).get("Nats-TTL")
    finally:
        await client.close()


async def _absent(kv, key: str) -> bool:
    try:
        await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return True
    return False
