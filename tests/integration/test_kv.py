"""KV access against a real nats-server: key listing that never reads a full bucket as empty, and
reads that survive a bucket made again with other settings."""

from __future__ import annotations

import uuid

import nats
import nats.errors
import pytest

from ocbridge.bridge.redact import Redactor
from ocbridge.bridge.storage.sessions import SessionStore
from ocbridge.bridge.storage.stores import NatsKeyValue
from ocbridge.client.client import CodingClient
from ocbridge.client.connection import NatsOptions
from ocbridge.client.kv import bind_bucket, list_keys
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


@pytest.mark.parametrize("before, after", [(True, False), (False, True)],
                         ids=["direct-then-leader", "leader-then-direct"])
async def test_reads_go_on_when_the_bucket_is_made_again_with_other_settings(js, before, after):
    """A bucket bound with direct gets (as Station makes its buckets) then deleted and made again
    without them (as nats-py makes them by default): reads follow, instead of failing with "no
    responders" for as long as the process lives. The other way round works as it is."""
    bucket = f"kv-{uuid.uuid4().hex[:8]}"
    await js.create_key_value(bucket=bucket, history=1, direct=before)
    kv = await bind_bucket(js, bucket)
    await kv.put("k", b"first")
    assert (await kv.get("k")).value == b"first"
    await js.delete_key_value(bucket)
    await js.create_key_value(bucket=bucket, history=1, direct=after)
    await kv.put("k", b"second")
    assert (await kv.get("k")).value == b"second"
    assert (await kv.get("k")).value == b"second"  # and the next read goes the new way at once


async def test_a_bucket_that_is_gone_reads_as_unreachable_not_as_empty(js):
    """While a direct-read bucket is gone, a read fails (the sidecar gives its task back) rather
    than reporting the key absent (which would start a new session instead of resuming one)."""
    bucket = f"kv-{uuid.uuid4().hex[:8]}"
    await js.create_key_value(bucket=bucket, history=1, direct=True)
    kv = await bind_bucket(js, bucket)
    await js.delete_key_value(bucket)
    with pytest.raises(nats.errors.NoRespondersError):
        await kv.get("k")


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
