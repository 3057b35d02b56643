"""Session leases on a real NATS KV bucket: the atomic operations, exclusion between two sidecars'
lease managers, and the bucket's ``max_age`` removing a lease nobody refreshes."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest

from ocbridge.bridge.storage.leases import SessionLeases
from ocbridge.bridge.storage.stores import NatsKeyValue, RevisionMismatch


@pytest.fixture
async def js(nats_server):
    nc = await nats.connect(nats_server.url)
    yield nc.jetstream()
    await nc.close()


async def bucket(js, ttl: float) -> NatsKeyValue:
    name = f"leases-{uuid.uuid4().hex[:8]}"
    return NatsKeyValue(js, name, await js.create_key_value(bucket=name, history=1, ttl=ttl))


async def test_atomic_operations_on_nats_kv(js):
    store = await bucket(js, ttl=60)
    first = await store.create("session with space", b"1")
    with pytest.raises(RevisionMismatch):
        await store.create("session with space", b"2")
    assert await store.entry("session with space") == (b"1", first)
    second = await store.update("session with space", b"2", first)
    with pytest.raises(RevisionMismatch):
        await store.update("session with space", b"3", first)
    with pytest.raises(RevisionMismatch):
        await store.delete_if("session with space", first)
    await store.delete_if("session with space", second)
    assert await store.entry("session with space") is None
    assert await store.create("session with space", b"4") > second  # created again after a delete


async def test_two_sidecars_never_hold_one_session_at_once(js):
    store = await bucket(js, ttl=60)
    one, two = SessionLeases(store, holder="sidecar-1"), SessionLeases(store, holder="sidecar-2")
    inside, overlaps = 0, []

    async def work(leases: SessionLeases, owner: str) -> None:
        nonlocal inside
        async with leases.hold("s1", owner=owner):
            inside += 1
            overlaps.append(inside)
            await store.entry("s1")  # a round trip: the others try meanwhile
            inside -= 1

    await asyncio.gather(*(work(one if i % 2 else two, f"task {i}") for i in range(6)))
    assert overlaps == [1] * 6
    assert await store.entry("s1") is None


async def test_the_bucket_max_age_frees_a_lease_nobody_refreshes(js):
    store = await bucket(js, ttl=1)
    await store.create("s1", b'{"owner": "a sidecar that died"}')
    # This waiter would take over only after 60 s: the lease is freed by the server's max_age.
    async with asyncio.timeout(10), SessionLeases(store, ttl=60).hold("s1", owner="task 1") as lease:
        assert lease.revision > 0
