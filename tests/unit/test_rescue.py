"""A dead neighbour's deliveries: given back (``-NAK`` on their ack subject) once each, and only
when their holder's process is provably gone and the subject is JetStream's ack subject."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys

from ocbridge.bridge.jetstream.rescue import Rescuer, sweep_interval
from ocbridge.bridge.storage.leases import MemoryKeyValue
from ocbridge.bridge.storage.liveness import process_identity

PREFIX = "\x1ftask:"


class Wire:
    """Stands in for the NATS connection: what was published."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, payload: bytes) -> None:
        self.published.append((subject, payload))


def gone_process() -> dict:
    """The identity of a process that has exited (a child that ran and was reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return {**process_identity(), "pid": int(child.stdout), "start": "0"}


def lease(process: dict, ack: str, owner: str) -> bytes:
    return json.dumps({"ack": ack, "owner": owner, "holder": "vm-1-abcd", "process": process}).encode()


async def test_only_deliveries_of_a_gone_holder_with_an_ack_subject_are_given_back_once():
    store, wire = MemoryKeyValue(), Wire()
    dead = gone_process()
    await store.put(PREFIX + "a", lease(dead, "$JS.ACK.TASKS.workers.1.7.7.0.0", "task a"))
    await store.put(PREFIX + "b", lease(process_identity(), "$JS.ACK.TASKS.workers.1.8.8.0.0", "task b"))  # alive
    await store.put(PREFIX + "c", lease(dead, "station.coding.result.c", "task c"))  # not an ack subject
    await store.put("session-lease", lease(dead, "$JS.ACK.TASKS.workers.1.9.9.0.0", "session s"))  # not a task
    rescuer = Rescuer(wire, store, prefix=PREFIX, interval=1.0)

    assert await rescuer.sweep() == 1
    assert wire.published == [("$JS.ACK.TASKS.workers.1.7.7.0.0", b"-NAK")]
    assert await rescuer.sweep() == 0  # the same lease (same revision) is not given back twice
    assert len(wire.published) == 1


async def test_lease_values_that_are_not_a_sidecars_are_ignored():
    """Junk in the leases bucket (not JSON, too deep, no process, an ack "subject" that is a
    wildcard or holds whitespace that would split the protocol line) gives nothing back."""
    store, wire = MemoryKeyValue(), Wire()
    dead = gone_process()
    junk = [b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b"[1, 2]",
            json.dumps({"ack": "$JS.ACK.x.1", "process": "nope"}).encode(),
            json.dumps({"ack": "$JS.ACK.x.1", "process": {"pid": [[]], "boot": {}}}).encode(),
            lease(dead, "$JS.ACK.a b", "task w"), lease(dead, "$JS.ACK.>", "task x"),
            lease(dead, "$JS.ACK.a\r\nPUB x 1", "task y"), lease(dead, "$JS.ACK.a..b", "task z")]
    for index, value in enumerate(junk):
        await store.put(f"{PREFIX}{index}", value)
    assert await Rescuer(wire, store, prefix=PREFIX, interval=1.0).sweep() == 0
    assert wire.published == []


def test_the_leases_are_looked_through_well_within_ack_wait():
    assert sweep_interval(30) == 7.5
    assert sweep_interval(2) == 1.0  # not more often than every second
    assert sweep_interval(3600) == 10.0  # a long ack_wait still gets a prompt rescue


async def test_the_loop_stops_when_cancelled_even_if_a_nats_call_swallowed_the_cancel():
    """Seen in CI: a sidecar's stop waited for ever on the rescue loop, whose cancel was lost inside
    a NATS call. The loop checks for a pending cancel after every sweep."""
    entered = asyncio.Event()

    class Swallowing(MemoryKeyValue):
        async def keys(self) -> list[str]:
            entered.set()
            with contextlib.suppress(asyncio.CancelledError):  # what the library call did
                await asyncio.sleep(10)
            return []

    loop = asyncio.create_task(Rescuer(Wire(), Swallowing(), prefix=PREFIX, interval=0.01).run_forever())
    await asyncio.wait_for(entered.wait(), 5)
    loop.cancel()
    done, _ = await asyncio.wait({loop}, timeout=5)
    assert loop in done and loop.cancelled()
