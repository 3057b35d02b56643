"""Session leases on the atomic store operations: exclusion, waiting, takeover, loss."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from ocbridge.bridge.storage.leases import MemoryKeyValue, SessionLeases
from ocbridge.bridge.storage.liveness import process_identity, provably_dead
from ocbridge.bridge.storage.stores import FolderKeyValue, RevisionMismatch


@pytest.fixture(params=["memory", "folder"])
def store(request, tmp_path):
    return MemoryKeyValue() if request.param == "memory" else FolderKeyValue(tmp_path / "leases")


class Watched:
    """Wraps a store: ``refused`` is set when a create is refused; ``updated`` after each update;
    ``stolen`` makes the next update find the lease taken over."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.refused = asyncio.Event()
        self.updates = 0
        self.updated = asyncio.Event()
        self.stolen = False

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def create(self, key: str, value: bytes) -> int:
        try:
            return await self.inner.create(key, value)
        except RevisionMismatch:
            self.refused.set()
            raise

    async def update(self, key: str, value: bytes, revision: int) -> int:
        if self.stolen:  # another holder took the lease over just before this refresh
            current = await self.inner.entry(key)
            await self.inner.update(key, b'{"owner": "thief"}', current[1])
            raise RevisionMismatch("taken over")
        revision = await self.inner.update(key, value, revision)
        self.updates += 1
        self.updated.set()
        return revision


async def test_atomic_operations(store):
    first = await store.create("k", b"1")
    with pytest.raises(RevisionMismatch):
        await store.create("k", b"2")
    assert await store.entry("k") == (b"1", first)
    second = await store.update("k", b"2", first)
    assert second != first
    with pytest.raises(RevisionMismatch):
        await store.update("k", b"3", first)
    with pytest.raises(RevisionMismatch):
        await store.delete_if("k", first)
    await store.delete_if("k", second)
    assert await store.entry("k") is None and await store.get("k") is None
    with pytest.raises(RevisionMismatch):
        await store.update("k", b"4", second)
    third = await store.create("k", b"5")
    assert third not in (first, second)
    assert await store.keys() == ["k"]


async def test_folder_stores_sharing_a_folder_see_each_others_revisions(tmp_path):
    one, two = FolderKeyValue(tmp_path / "l"), FolderKeyValue(tmp_path / "l")
    revision = await one.create("session/a b", b"x")
    with pytest.raises(RevisionMismatch):
        await two.create("session/a b", b"y")
    assert await two.entry("session/a b") == (b"x", revision)
    await two.update("session/a b", b"y", revision)
    with pytest.raises(RevisionMismatch):
        await one.delete_if("session/a b", revision)


async def test_a_second_holder_waits_until_the_first_releases(store):
    watched = Watched(store)
    leases = SessionLeases(watched)
    order = []

    async def second():
        async with leases.hold("s1", owner="task 2"):
            order.append("second")

    async with leases.hold("s1", owner="task 1") as lease:
        waiter = asyncio.create_task(second())
        await watched.refused.wait()
        async with leases.hold("s2", owner="task 3"):  # another session is free
            order.append("other")
        order.append("first")
        assert json.loads(lease.value)["owner"] == "task 1"
    await waiter
    assert order == ["other", "first", "second"]
    assert await store.entry("s1") is None


async def test_an_abandoned_lease_is_taken_over_after_its_ttl(store):
    await store.create("s1", json.dumps({"owner": "task 0", "holder": "a dead sidecar"}).encode())
    leases = SessionLeases(store, ttl=0.05)
    async with asyncio.timeout(5):
        async with leases.hold("s1", owner="task 1") as lease:
            assert json.loads((await store.entry("s1"))[0])["owner"] == "task 1"
            assert not lease.lost.is_set()


async def test_a_refreshed_lease_is_never_taken_over():
    store = Watched(MemoryKeyValue())
    holder, waiter = SessionLeases(store, ttl=0.3), SessionLeases(store, ttl=0.3)
    acquired = []

    async def wait_for_it():
        async with waiter.hold("s1", owner="task 2"):
            acquired.append(store.updates)

    async with holder.hold("s1", owner="task 1"):
        waiting = asyncio.create_task(wait_for_it())
        while store.updates < 4:  # four refreshes: more than a TTL has passed
            store.updated.clear()
            await store.updated.wait()
        assert not waiting.done() and not acquired
    await waiting
    assert acquired


async def test_a_lease_taken_over_is_reported_lost():
    store = Watched(MemoryKeyValue())
    lost = asyncio.Event()
    async with SessionLeases(store, ttl=0.03).hold("s1", owner="task 1", on_lost=lost.set) as lease:
        store.stolen = True
        await lost.wait()
        assert lease.lost.is_set()
    assert (await store.entry("s1"))[0] == b'{"owner": "thief"}'  # not deleted: it is someone else's


async def test_a_refresh_whose_reply_was_lost_keeps_the_lease():
    class LostReply(Watched):
        async def update(self, key: str, value: bytes, revision: int) -> int:
            new = await self.inner.update(key, value, revision)
            self.updates += 1
            self.updated.set()
            if self.updates == 1:
                raise TimeoutError  # applied, but the reply was lost
            return new

    store = LostReply(MemoryKeyValue())
    lost = asyncio.Event()
    async with SessionLeases(store, ttl=0.3).hold("s1", owner="task 1", on_lost=lost.set) as lease:
        while store.updates < 3:
            store.updated.clear()
            await store.updated.wait()
        assert not lease.lost.is_set()
    assert await store.entry("s1") is None  # released with the revision it adopted


async def test_a_lease_held_by_an_earlier_run_of_the_same_owner_is_taken_back_at_once(store):
    # The task's earlier run died holding the session lease; its next run must not wait a TTL.
    await store.create("s1", json.dumps({"owner": "task 7", "holder": "a dead sidecar"}).encode())
    leases = SessionLeases(store, ttl=3600)
    async with asyncio.timeout(2), leases.hold("s1", owner="task 7") as lease:
        assert not lease.lost.is_set()
        assert json.loads((await store.entry("s1"))[0])["holder"] == leases.holder


async def test_try_hold_never_waits_and_reports_a_live_holder(store):
    first, second = SessionLeases(store, ttl=3600), SessionLeases(store, ttl=3600)
    async with first.try_hold("t", owner="task 1") as held:
        assert held is not None
        async with second.try_hold("t", owner="task 1 copy") as other:
            assert other is None
    async with second.try_hold("t", owner="task 1 copy") as after:
        assert after is not None


def _lease_held_by_a_child(folder) -> subprocess.Popen:
    """A real process that takes lease ``t`` in a folder store and then sleeps (until killed)."""
    code = (
        "import asyncio, sys, time\n"
        "from ocbridge.bridge.storage.leases import SessionLeases\n"
        "from pathlib import Path\n"
        "from ocbridge.bridge.storage.stores import FolderKeyValue\n"
        "async def main():\n"
        f"    leases = SessionLeases(FolderKeyValue(Path({str(folder)!r})), ttl=3600)\n"
        "    async with leases.try_hold('t', owner='task 1') as lease:\n"
        "        assert lease is not None\n"
        "        print('held', flush=True)\n"
        "        await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


async def test_a_lease_whose_holder_process_died_is_taken_over_at_once(tmp_path):
    store = FolderKeyValue(tmp_path / "leases")
    child = _lease_held_by_a_child(tmp_path / "leases")
    leases = SessionLeases(store, ttl=3600)  # the TTL alone would block for an hour
    try:
        async with leases.try_hold("t", owner="task 1 copy") as lease:
            assert lease is None  # its holder is alive
    finally:
        child.kill()
        child.wait(10)
    async with asyncio.timeout(10):
        async with leases.try_hold("t", owner="task 1 copy") as lease:
            assert lease is not None
            assert json.loads((await store.entry("t"))[0])["owner"] == "task 1 copy"
        # and a waiting holder too
        child = _lease_held_by_a_child(tmp_path / "leases")
        child.kill()
        child.wait(10)
        async with leases.hold("t", owner="task 2") as lease:
            assert not lease.lost.is_set()


@pytest.mark.parametrize("identity", [
    None, {}, {"boot": "x", "pidns": "y", "pid": 1, "start": "1"}, {"pid": True},
])
def test_a_holder_on_another_host_or_unreadable_is_never_called_dead(identity):
    assert provably_dead(identity) is False


def test_this_process_and_a_reused_pid_are_told_apart():
    mine = process_identity()
    assert provably_dead(mine) is False
    assert provably_dead({**mine, "start": str(int(mine["start"]) - 1)}) is True  # pid reused since


class LostReply:
    """Wraps a store: the next ``create`` is stored but its caller gets a timeout (NATS restarting)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.lose_next = True

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def create(self, key: str, value: bytes) -> int:
        revision = await self.inner.create(key, value)
        if self.lose_next:
            self.lose_next = False
            raise TimeoutError("nats: timeout")
        return revision


async def test_a_lease_left_by_a_create_whose_reply_was_lost_is_taken_back_at_once(store):
    leases = SessionLeases(LostReply(store), ttl=3600, holder="sidecar-1")
    with pytest.raises(TimeoutError):
        async with leases.try_hold("t", owner="task 1"):
            pass
    assert await store.entry("t") is not None  # stored, and nobody refreshes it
    async with asyncio.timeout(5):
        async with leases.try_hold("t", owner="task 1") as lease:
            assert lease is not None
            # While it is held here, another copy of the same work is told to wait.
            async with leases.try_hold("t", owner="task 1") as copy:
                assert copy is None
    assert await store.entry("t") is None


async def test_another_holders_live_lease_is_never_taken_as_abandoned(store):
    first = SessionLeases(store, ttl=3600, holder="sidecar-1")
    second = SessionLeases(store, ttl=3600, holder="sidecar-2")  # same process, another sidecar
    async with first.try_hold("t", owner="task 1") as held:
        assert held is not None
        async with second.try_hold("t", owner="task 1") as other:
            assert other is None
