"""JetStream delivery rules against a real nats-server, with ScriptedEngine as the agent (fast).

What a task may name, duplicates of one taskID, results larger than the server allows, give-backs
that are not the task's fault, an unhealthy engine, and a consumer made by someone else.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.js import api
from nats.js.errors import KeyNotFoundError

from ocbridge.bridge import Sidecar
from ocbridge.bridge.engines import EngineUnavailable
from ocbridge.bridge.engines.scripted import Delay, ScriptedEngine, Tool, Usage
from ocbridge.bridge.jetstream.journal import RESULT_HEADER, result_mark
from ocbridge.bridge.jetstream.setup import ConsumerMismatch
from ocbridge.client import CodingClient, TaskResult
from ocbridge.client.protocol import Naming, TaskRecord, cancel_key, record_key
from support.stack import sidecar_config, unique_naming


class Counting(ScriptedEngine):
    """A ScriptedEngine that counts prompts and can be made unhealthy."""

    def __init__(self, script=("done",), *, healthy: bool = True) -> None:
        super().__init__(script)
        self.is_healthy = healthy

    def healthy(self) -> bool:
        return self.is_healthy


class Stack:
    def __init__(self, nats_url: str, tmp: Path, naming: Naming) -> None:
        self.url, self.tmp, self.naming = nats_url, tmp, naming
        self.sidecars: list[Sidecar] = []
        self.nc: nats.NATS | None = None
        self.client: CodingClient | None = None

    async def sidecar(self, engine: ScriptedEngine, **overrides) -> Sidecar:
        index = len(self.sidecars)
        config = sidecar_config(self.url, self.tmp / f"s{index}", self.naming, **overrides)
        sidecar = Sidecar(config, engine=engine)
        await sidecar.start()
        self.sidecars.append(sidecar)
        return sidecar

    def task(self, task_id: str | None = None, prompt: str = "go", **fields) -> dict:
        task_id = task_id or uuid.uuid4().hex
        body = {
            "taskID": task_id,
            "session": {"name": f"s-{task_id[:8]}"},
            "workspace": {"name": "ws"},
            "prompt": prompt,
            "callback": {
                "streamSubject": self.naming.stream_subject(task_id),
                "resultSubject": self.naming.result_subject(task_id),
            },
        }
        body.update(fields)
        return body

    async def results(self, subject: str) -> asyncio.Queue[TaskResult]:
        queue: asyncio.Queue[TaskResult] = asyncio.Queue()

        async def on_result(msg) -> None:
            queue.put_nowait(TaskResult.from_wire(msg.data))

        await self.nc.subscribe(subject, cb=on_result)
        return queue

    async def publish(self, body: dict | bytes) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        await self.nc.publish(self.naming.task_subject, data)
        await self.nc.flush()

    async def dead_letters(self) -> list[dict]:
        js = self.nc.jetstream()
        try:
            info = await js.stream_info(self.naming.dead_letter_stream)
        except Exception:
            return []
        out = []
        if not info.state.messages:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(self.naming.dead_letter_stream, seq)
            out.append({"reason": (msg.headers or {}).get("Ocbridge-Reason", ""), "data": msg.data})
        return out

    async def close(self) -> None:
        for sidecar in self.sidecars:
            await sidecar.stop(grace=2)
        if self.nc is not None:
            await self.nc.close()


@pytest.fixture
async def stack(nats_server, tmp_path) -> AsyncIterator[Stack]:
    s = Stack(nats_server.url, tmp_path, unique_naming())
    s.nc = await nats.connect(nats_server.url)
    try:
        yield s
    finally:
        await s.close()


async def _next(queue: asyncio.Queue[TaskResult], timeout: float = 20) -> TaskResult:
    return await asyncio.wait_for(queue.get(), timeout)


async def _nothing_more(queue: asyncio.Queue, stack: Stack) -> None:
    """No further message: flush a round trip through the server, then look."""
    await stack.nc.flush()
    await asyncio.sleep(0)  # let delivered callbacks run
    assert queue.empty()


# ------------------------------------------------------------------------------ what a task may name


@pytest.mark.parametrize("bad", [
    "$JS.API.STREAM.DELETE.{stream}",
    "$KV.{sessions}.victim",
    "{cancel}.victim",
    "{task}",
    "{result_prefix}.*",
    "{result_prefix}.>",
    "{result_prefix}.other-task",
    "_INBOX.abc",
    "{result_prefix}..x",
])
async def test_a_task_naming_a_subject_not_its_own_is_dead_lettered_and_nothing_is_published_there(stack, bad):
    engine = Counting()
    await stack.sidecar(engine)
    naming = stack.naming
    subject = bad.format(stream=naming.stream_name, sessions=naming.sessions_bucket, cancel=naming.cancel_root,
                         task=naming.task_subject, result_prefix=naming.result_prefix)
    seen: list[bytes] = []

    async def record(msg) -> None:
        seen.append(msg.data)

    if "*" not in subject and ">" not in subject and ".." not in subject:
        await stack.nc.subscribe(subject, cb=record)
    task = stack.task()
    task["callback"]["resultSubject"] = subject
    await stack.publish(task)
    published = json.dumps(task).encode()
    for _ in range(200):
        letters = await stack.dead_letters()
        if letters:
            break
        await asyncio.sleep(0.05)
    assert len(letters) == 1 and "unacceptable callback" in letters[0]["reason"]
    assert [data for data in seen if data != published] == [] and engine.requests == []
    # The stream is still there and the sidecar keeps serving.
    ok = stack.task()
    results = await stack.results(ok["callback"]["resultSubject"])
    await stack.publish(ok)
    assert (await _next(results)).status == "completed"


@pytest.mark.parametrize("body, reason", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper"),
    (b"not json", "not JSON"),
])
async def test_unreadable_bodies_are_dead_lettered_once(stack, body, reason):
    await stack.sidecar(Counting())
    await stack.publish(body)
    for _ in range(200):
        letters = await stack.dead_letters()
        if letters:
            break
        await asyncio.sleep(0.05)
    assert [reason in letter["reason"] for letter in letters] == [True]


async def test_an_oversized_or_deep_task_with_its_own_callback_gets_an_error_result(stack):
    await stack.sidecar(Counting(), jetstream={"max_task_bytes": 4096})
    big = stack.task(prompt="x" * 10_000)
    deep = stack.task()
    deep["extra"] = json.loads("[" * 40 + "]" * 40)
    queues = [await stack.results(t["callback"]["resultSubject"]) for t in (big, deep)]
    for task in (big, deep):
        await stack.publish(task)
    big_result, deep_result = [await _next(q) for q in queues]
    assert big_result.error_type == "invalid_task" and "exceeds the limit of 4096" in big_result.error
    assert deep_result.error_type == "invalid_task" and "nested deeper" in deep_result.error


async def test_a_secret_token_of_a_dead_lettered_task_is_not_kept(stack):
    await stack.sidecar(Counting())
    task = stack.task()
    task["callback"]["resultSubject"] = "$JS.API.X"
    task["workspace"]["git"] = {"url": "https://example.invalid/r.git", "token": "tok-ABCDEF-987654321"}
    await stack.publish(task)
    for _ in range(200):
        letters = await stack.dead_letters()
        if letters:
            break
        await asyncio.sleep(0.05)
    assert letters and b"tok-ABCDEF-987654321" not in letters[0]["data"]


# ------------------------------------------------------------------------------------ exactly once


async def test_the_same_task_id_twice_runs_once_and_both_copies_get_the_result(stack):
    engine = Counting(["hello ", Tool("bash", args={"command": "true"}), Usage(10, 5, 0.01)])
    await stack.sidecar(engine)
    task = stack.task()
    results = await stack.results(task["callback"]["resultSubject"])
    await stack.publish(task)
    first = await _next(results)
    await stack.publish(task)
    second = await _next(results)
    assert first.status == second.status == "completed"
    assert second.model_dump() == first.model_dump()
    assert len(engine.requests) == 1


@pytest.mark.parametrize("reached_the_server", [True, False])
async def test_a_result_left_publishing_by_a_dead_sidecar_goes_out_once(stack, reached_the_server):
    """The sidecar running the task stored its result (``publishing``) and died before recording
    it ``done``: whether it had published it or not, the redelivery publishes it at most once more,
    so subscribers see it exactly once, and the agent never runs again."""
    await stack.sidecar(Counting())  # makes the stream, buckets and journal
    await stack.sidecars.pop().stop(grace=2)
    js = stack.nc.jetstream()
    task = stack.task()
    task_id, subject = task["taskID"], task["callback"]["resultSubject"]
    seq = (await js.stream_info(stack.naming.stream_name)).state.last_seq + 1  # of the task published below
    record = TaskRecord(taskID=task_id, state="publishing", sidecar="dead", attempt=1, retries=0, streamSeq=seq,
                        result=TaskResult(taskID=task_id, status="completed", result="from the dead sidecar"))
    tasks = await js.key_value(stack.naming.tasks_bucket)
    await tasks.put(record_key(task_id), json.dumps(record.to_dict()).encode())
    results = await stack.results(subject)
    if reached_the_server:  # as the dead sidecar published it
        await stack.nc.publish(subject, record.result.to_wire(), headers={RESULT_HEADER: result_mark(record)})
        assert (await _next(results)).result == "from the dead sidecar"
    await stack.publish(task)
    engine = Counting()
    await stack.sidecar(engine)
    if not reached_the_server:
        assert (await _next(results)).result == "from the dead sidecar"
    for _ in range(200):
        stored = TaskRecord.model_validate_json((await tasks.get(record_key(task_id))).value)
        info = await js.consumer_info(stack.naming.stream_name, stack.naming.consumer_name)
        if stored.state == "done" and info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.05)
    assert stored.state == "done" and info.num_ack_pending == 0 and info.num_pending == 0
    await _nothing_more(results, stack)
    assert engine.requests == []


async def test_a_copy_arriving_while_the_first_runs_waits_for_its_result(stack):
    release, started = asyncio.Event(), asyncio.Event()

    async def slow(request):
        started.set()
        await release.wait()
        return ["finished"]

    engine = Counting(slow)
    await stack.sidecar(engine, jetstream={"retry_delay": 0.2})
    task = stack.task()
    results = await stack.results(task["callback"]["resultSubject"])
    await stack.publish(task)
    await asyncio.wait_for(started.wait(), 20)
    await stack.publish(task)
    js = stack.nc.jetstream()
    for _ in range(200):  # the copy is given back (not run) while the first one runs
        info = await js.consumer_info(stack.naming.stream_name, stack.naming.consumer_name)
        if info.num_redelivered >= 1:
            break
        await asyncio.sleep(0.05)
    assert info.num_redelivered >= 1 and len(engine.requests) == 1
    release.set()
    first, second = await _next(results), await _next(results)
    assert first.result == second.result == "finished"
    assert len(engine.requests) == 1


async def test_a_result_larger_than_max_payload_is_spilled_and_recorded(stack):
    engine = Counting(["y" * 1024] * 2048)  # 2 MiB of answer, in deltas as an agent streams it
    await stack.sidecar(engine)
    task = stack.task()
    results = await stack.results(task["callback"]["resultSubject"])
    await stack.publish(task)
    result = await _next(results)
    assert result.status == "completed" and result.result is None
    assert result.spilled == {"result": f"output/{task['taskID']}/result.result.json"}
    store = await stack.nc.jetstream().object_store(stack.naming.object_store)
    stored = json.loads((await store.get(result.spilled["result"])).data)
    assert stored["value"] == "y" * (2 * 1024 * 1024)
    kv = await stack.nc.jetstream().key_value(stack.naming.tasks_bucket)
    record = TaskRecord.model_validate_json((await kv.get(record_key(task["taskID"]))).value)
    assert record.state == "done" and record.result.spilled == result.spilled


# ----------------------------------------------------------------------------- not the task's fault


async def test_an_unavailable_engine_gives_the_task_back_and_it_completes_later(stack):
    calls = []

    def flaky(request):
        calls.append(request)
        if len(calls) == 1:
            raise EngineUnavailable("OpenCode is restarting", retry_after=0.2)
        return ["made it"]

    engine = Counting(flaky)
    await stack.sidecar(engine, jetstream={"max_attempts": 1})
    task = stack.task()
    results = await stack.results(task["callback"]["resultSubject"])
    await stack.publish(task)
    result = await _next(results)
    assert result.status == "completed" and result.result == "made it"
    kv = await stack.nc.jetstream().key_value(stack.naming.tasks_bucket)
    record = TaskRecord.model_validate_json((await kv.get(record_key(task["taskID"]))).value)
    assert (record.attempt, record.retries) == (2, 1)
    await _nothing_more(results, stack)


async def test_an_unhealthy_sidecar_takes_no_task_and_a_healthy_one_does(stack):
    sick = Counting(healthy=False)
    await stack.sidecar(sick)
    task = stack.task()
    results = await stack.results(task["callback"]["resultSubject"])
    await stack.publish(task)
    with pytest.raises(TimeoutError):
        await _next(results, timeout=2)
    well = Counting(["ok"])
    await stack.sidecar(well)
    assert (await _next(results)).result == "ok"
    assert sick.requests == [] and len(well.requests) == 1


async def test_a_cancel_key_is_removed_when_the_task_ends(stack):
    await stack.sidecar(Counting([Delay(5), "late"]))
    client = await CodingClient.connect(stack.url, naming=stack.naming)
    try:
        handle = await client.submit("go", workspace="ws")
        await client.cancel(handle.task_id)
        result = await handle.result(timeout=20)
        assert result.status == "cancelled"
        kv = await stack.nc.jetstream().key_value(stack.naming.state_bucket)
        with pytest.raises(KeyNotFoundError):
            await kv.get(cancel_key(handle.task_id))
    finally:
        await client.close()


# --------------------------------------------------------------------------------------- consumer


async def test_an_existing_consumer_is_updated_to_the_configured_settings(stack):
    js = stack.nc.jetstream()
    naming = stack.naming
    await js.add_stream(name=naming.stream_name, subjects=[naming.task_subject],
                        retention=api.RetentionPolicy.WORK_QUEUE)
    await js.add_consumer(naming.stream_name, api.ConsumerConfig(
        durable_name=naming.consumer_name, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=2, max_deliver=2,
        filter_subject=naming.task_subject,
    ))
    await stack.sidecar(Counting(), jetstream={"ack_wait": 7})
    info = await js.consumer_info(naming.stream_name, naming.consumer_name)
    assert info.config.ack_wait == 7 and info.config.max_deliver == 1000


async def test_a_consumer_that_cannot_be_used_stops_the_sidecar_with_a_clear_message(stack):
    js = stack.nc.jetstream()
    naming = stack.naming
    await js.add_stream(name=naming.stream_name, subjects=[naming.task_subject],
                        retention=api.RetentionPolicy.WORK_QUEUE)
    await js.add_consumer(naming.stream_name, api.ConsumerConfig(
        durable_name=naming.consumer_name, ack_policy=api.AckPolicy.EXPLICIT, filter_subject=naming.task_subject,
        deliver_subject="elsewhere.push",
    ))
    # A push consumer cannot become the pull consumer the sidecars share.
    with pytest.raises(ConsumerMismatch, match="push consumer"):
        await stack.sidecar(Counting())


async def test_the_sidecar_works_with_buckets_station_created_first(stack):
    js = stack.nc.jetstream()
    naming = stack.naming
    week = 7 * 24 * 3600
    for bucket in (naming.sessions_bucket, naming.state_bucket):
        # as Station creates them (nats.go: allow_direct on)
        await js.create_key_value(bucket=bucket, history=1, ttl=week, direct=True)
    await stack.sidecar(Counting(["ok"]))
    task = stack.task()
    results = await stack.results(task["callback"]["resultSubject"])
    await stack.publish(task)
    assert (await _next(results)).status == "completed"
    sessions = await js.key_value(naming.sessions_bucket)
    assert (await sessions.get(task["session"]["name"])).value
    # Whoever creates a bucket first, it gets Station's settings.
    for bucket in (naming.sessions_bucket, naming.state_bucket):
        status = await (await js.key_value(bucket)).status()
        assert (status.history, status.ttl, status.stream_info.config.allow_direct) == (1, week, True)
    fresh = Stack(stack.url, stack.tmp / "fresh", unique_naming())
    fresh.nc = stack.nc
    await fresh.sidecar(Counting())
    try:
        for bucket in (fresh.naming.sessions_bucket, fresh.naming.state_bucket):
            status = await (await js.key_value(bucket)).status()
            assert (status.history, status.ttl, status.stream_info.config.allow_direct) == (1, week, True)
        # The sidecar's own records and leases are read from the stream's leader only.
        for bucket in (fresh.naming.tasks_bucket, fresh.naming.leases_bucket):
            assert not (await (await js.key_value(bucket)).status()).stream_info.config.allow_direct
    finally:
        fresh.nc = None
        await fresh.close()
