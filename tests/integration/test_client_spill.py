"""Results and op replies larger than the server's max_payload, published by hand as the sidecar
spills them (large fields in a real object store), read back whole by the client."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from ocbridge.client.client import CodingClient
from ocbridge.client.connection import NatsOptions
from ocbridge.client.protocol import GitOpRequest, TaskRecord, record_key
from ocbridge.client.protocol.spill import encode, spill
from ocbridge.client.station.backends.nats import NatsBackend
from support.stack import unique_naming


@pytest.fixture
async def client(nats_server):
    client = await CodingClient.connect(nats_server.url, naming=unique_naming())
    yield client
    await client.close()


def big_changes(count: int = 12_000) -> list[dict]:
    return [{"path": f"src/module_{i:05d}/a/rather/long/path/to/some/generated_file_{i}.py",
             "status": "added", "insertions": i, "deletions": 0} for i in range(count)]


def big_result(task_id: str) -> dict:
    return {"taskID": task_id, "status": "completed", "result": "changed many files",
            "metrics": {"streamEvents": 0}, "changes": big_changes(), "patch": f"output/{task_id}/changes.patch"}


async def spilled(client: CodingClient, payload: dict, prefix: str, *, store: bool = True) -> bytes:
    """What the sidecar publishes: the message under max_payload, the large fields stored."""
    limit = client.nc.max_payload
    assert len(encode(payload)) > limit  # too large to publish as is
    message, objects = spill(payload, limit=limit, object_name=lambda field: f"{prefix}/{field}.json")
    assert message["spilled"] and len(encode(message)) < limit
    if store:
        files = await _files(client)
        for name, data in objects.items():
            await files.put(name, data)
    return encode(message)


async def _files(client: CodingClient):
    try:
        return await client._js.object_store(client.naming.object_store)
    except nats.js.errors.NotFoundError:
        return await client._js.create_object_store(client.naming.object_store)


async def test_a_spilled_result_is_restored(client):
    handle = await client.submit("change everything", workspace="ws")
    payload = big_result(handle.task_id)
    await client.nc.publish(handle.result_subject, await spilled(client, payload, f"output/{handle.task_id}"))
    result = await handle.result(timeout=30)
    assert result.spilled is None
    assert len(result.changes) == 12_000 and result.changes[-1].insertions == 11_999
    assert result.result == payload["result"] and result.patch == payload["patch"]
    assert [c.to_dict() for c in result.changes] == payload["changes"]


async def test_a_spilled_result_in_the_task_record_is_restored(client):
    task_id = "recorded-big"
    payload = big_result(task_id)
    message = json.loads(await spilled(client, payload, f"output/{task_id}"))
    tasks = await client._js.create_key_value(bucket=client.naming.tasks_bucket)
    record = {"taskID": task_id, "state": "done", "attempt": 1, "result": message}
    await tasks.put(record_key(task_id), json.dumps(record).encode())

    got = await client.task_record(task_id)
    assert isinstance(got, TaskRecord) and len(got.result.changes) == 12_000 and got.result.spilled is None
    watched = await client.watch(task_id)
    assert len((await watched.result(timeout=5)).changes) == 12_000


async def test_a_missing_spilled_object_is_reported_not_raised(client, caplog):
    handle = await client.submit("change everything", workspace="ws")
    await _files(client)  # the store exists, the objects were never written (or expired)
    message = await spilled(client, big_result(handle.task_id), f"output/{handle.task_id}", store=False)
    await client.nc.publish(handle.result_subject, message)
    result = await handle.result(timeout=30)
    assert result.ok and result.changes is None
    assert result.spilled == {"changes": f"output/{handle.task_id}/changes.json"}
    assert "not read back" in caplog.text


async def test_a_spilled_result_without_an_object_store_is_reported(nats_server):
    client = await CodingClient.connect(nats_server.url, naming=unique_naming(), spill_timeout=5)
    try:
        handle = await client.submit("change everything", workspace="ws")
        message = await spilled(client, big_result(handle.task_id), "out", store=False)
        await client.nc.publish(handle.result_subject, message)
        result = await handle.result(timeout=30)
        assert result.changes is None and result.spilled == {"changes": "out/changes.json"}
    finally:
        await client.close()


async def test_a_spilled_op_reply_is_restored_by_the_nats_backend(nats_server, client):
    naming = client.naming
    patch = "".join(f"+line {i} of a very large diff that does not fit in one message\n" for i in range(40_000))
    reply = {"ok": True, "op": "diff", "session": "s", "patch": patch, "changes": big_changes(2000)}

    async def answer(msg) -> None:
        assert GitOpRequest.from_wire(msg.data).op == "diff"
        await msg.respond(await spilled(client, reply, "ops/diff-1"))

    sub = await client.nc.subscribe(naming.ops_subject, queue=naming.ops_queue, cb=answer)
    backend = NatsBackend(NatsOptions(url=nats_server.url), naming=naming)
    await backend.start()
    try:
        got = await backend.op(GitOpRequest(op="diff", session="s"))
        assert got.ok and got.spilled is None
        assert got.patch == patch and len(got.changes) == 2000
    finally:
        await backend.aclose()
        await sub.unsubscribe()


async def test_an_unreadable_op_reply_is_a_backend_error(nats_server, client):
    naming = client.naming

    async def answer(msg) -> None:
        await msg.respond(b"[not an object]")

    sub = await client.nc.subscribe(naming.ops_subject, queue=naming.ops_queue, cb=answer)
    backend = NatsBackend(NatsOptions(url=nats_server.url), naming=naming)
    await backend.start()
    try:
        with pytest.raises(Exception, match="unreadable reply"):
            await backend.op(GitOpRequest(op="status", session="s"))
    finally:
        await backend.aclose()
        await sub.unsubscribe()
        await asyncio.sleep(0)
