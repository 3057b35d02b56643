"""KV access against a real nats-server: key listing that never reads a full bucket as empty."""

from __future__ import annotations

import uuid

import nats
import pytest

from ocbridge.bridge.redact import Redactor
from ocbridge.bridge.storage.sessions import SessionStore
from ocbridge.bridge.storage.stores import NatsKeyValue
from ocbridge.client.client import CodingClient
from ocbridge.client.connection import NatsOptions
from ocbridge.client.kv import list_keys
from ocbridge.client.protocol import SessionState, iso_now
from ocbridge.client.station.backends.nats import NatsBackend
from support.stack import unique_naming


@pytest.fixture
async def js(nats_server):
    nc = await nats.connect(nats_server.url)
    yield nc.jetstream()
    await nc.close()


async def test_listing_sees_every_key_every_time(js):
    """Regression: nats-py's ``KeyValue.keys()`` intermittently reports a full bucket as empty."""
    bucket = f"kv-{uuid.uuid4().hex[:8]}"
    kv = await js.create_key_value(bucket=bucket)
    names = [f"session-{i}" for i in range(5)]
    for name in names:
        await kv.put(name, b"{}")
    for _ in range(200):
        assert await list_keys(js, bucket) == sorted(names)


async def test_store_round_trip_with_names_nats_would_refuse(js):
    bucket = f"kv-{uuid.uuid4().hex[:8]}"
    store = NatsKeyValue(js, bucket, await js.create_key_value(bucket=bucket))
    await store.put("plain", b"1")
    await store.put("with space/and*star", b"2")
    await store.put("gone", b"3")
    await store.delete("gone")
    assert sorted(await store.keys()) == ["gone", "plain", "with space/and*star"]  # a deleted key is listed
    assert await store.get("gone") is None  # ... and reads as absent
    assert await store.get("with space/and*star") == b"2"


async def test_sessions_listed_by_sidecar_store_and_client(nats_server, js):
    bucket = f"sessions-{uuid.uuid4().hex[:8]}"
    sessions = SessionStore(NatsKeyValue(js, bucket, await js.create_key_value(bucket=bucket)), Redactor())
    for name in ("alpha", "beta"):
        await sessions.put(SessionState(sessionName=name, opencodeID=f"ses_{name}", workspaceName=name,
                                        workspacePath=f"/w/{name}",
                                        created=iso_now(), lastUsed=iso_now()))
    await sessions.delete("alpha")
    assert [s.session_name for s in await sessions.all()] == ["beta"]

    client = await CodingClient.connect(nats_server.url, naming=_naming(sessions_bucket=bucket))
    try:
        assert [s.session_name for s in await client.list_sessions()] == ["beta"]
    finally:
        await client.close()


async def test_backend_lists_no_sessions_when_no_sidecar_ever_ran(nats_server):
    backend = NatsBackend(NatsOptions(url=nats_server.url),
                          naming=_naming(sessions_bucket=f"never-{uuid.uuid4().hex[:8]}"))
    await backend.start()
    try:
        assert await backend.sessions() == []
    finally:
        await backend.aclose()


def _naming(**fields):
    return unique_naming().model_copy(update=fields)
