"""The fleet view: sidecar heartbeats in KV and ``ocbridge status``, run as an operator runs it.

A real nats-server; the agent is a ScriptedEngine (in-process) or the scripted sidecar process
(SIGKILLed), so only the delivery and heartbeat code is under test. Heartbeats every 0.5 s with a
2 s TTL; every wait is a poll with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.errors import NotFoundError

from ocbridge.bridge import Sidecar
from ocbridge.bridge.engines.scripted import Delay, ScriptedEngine
from ocbridge.bridge.jetstream.natsd import free_port
from ocbridge.client import CodingClient
from ocbridge.client.protocol import Naming, TaskStatus, kv_key
from support.faults import ScriptedSidecarProcess, wait_until
from support.operator import naming_env, ocbridge
from support.stack import sidecar_config, unique_naming

HEARTBEAT = {"heartbeat_interval": 0.5, "heartbeat_ttl": 2}


def fleet_naming() -> Naming:
    """Names of one test, its own sidecars and leases buckets included (other tests' sidecars
    beat into the default bucket)."""
    naming = unique_naming()
    tag = naming.stream_name.split("_", 1)[1]
    return naming.model_copy(update={"sidecars_bucket": f"sidecars-{tag}", "leases_bucket": f"leases-{tag}"})


class Fleet:
    """One test's names, sidecars and a plain NATS connection."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.url, self.tmp = url, tmp
        self.naming = fleet_naming()
        self.sidecars: list[Sidecar] = []
        self.processes: list[ScriptedSidecarProcess] = []
        self.nc: nats.NATS | None = None

    def config(self, index: int, **overrides: Any) -> Any:
        return sidecar_config(self.url, self.tmp / f"s{index}", self.naming, observability=HEARTBEAT, **overrides)

    async def sidecar(self, engine: ScriptedEngine, **overrides: Any) -> Sidecar:
        sidecar = Sidecar(self.config(len(self.sidecars), **overrides), engine=engine)
        await sidecar.start()
        self.sidecars.append(sidecar)
        return sidecar

    async def status(self) -> dict[str, Any]:
        code, out, err = await ocbridge("status", "--json", "--nats-url", self.url, "--timeout", "10",
                                        env=naming_env(self.naming))
        assert code == 0, err
        return json.loads(out)

    async def sidecar_ids(self) -> set[str]:
        return {s["id"] for s in (await self.status())["sidecars"]}

    def task(self, prompt: str = "go") -> dict[str, Any]:
        task_id = uuid.uuid4().hex
        return {
            "taskID": task_id, "prompt": prompt,
            "session": {"name": f"s-{task_id[:8]}"}, "workspace": {"name": "ws"},
            "callback": {"streamSubject": self.naming.stream_subject(task_id),
                         "resultSubject": self.naming.result_subject(task_id)},
        }

    async def publish(self, body: dict[str, Any] | bytes) -> None:
        """A plain core-NATS publish, as Station does."""
        assert self.nc is not None
        await self.nc.publish(self.naming.task_subject, body if isinstance(body, bytes) else json.dumps(body).encode())
        await self.nc.flush()

    async def close(self) -> None:
        for sidecar in self.sidecars:
            await bounded(sidecar.stop(grace=1), f"stopping sidecar {sidecar.id}")
        for process in self.processes:
            await bounded(process.kill(), "killing a sidecar process")
        if self.nc is not None:
            await bounded(self.nc.close(), "closing the test's NATS connection")


async def bounded(step: Awaitable[None], what: str, limit: float = 60) -> None:
    """A teardown step that must end: on a hang, every task's stack goes to stderr and the test fails
    with what hung (instead of pytest-timeout's thread dump, which shows no coroutine)."""
    try:
        await asyncio.wait_for(step, limit)
    except TimeoutError:
        for task in asyncio.all_tasks():
            task.print_stack(file=sys.stderr)
        pytest.fail(f"{what} did not end within {limit:.0f}s")


@pytest.fixture
async def fleet(nats_server, tmp_path) -> AsyncIterator[Fleet]:
    f = Fleet(nats_server.url, tmp_path)
    f.nc = await nats.connect(nats_server.url)
    try:
        yield f
    finally:
        await f.close()


async def test_a_sidecar_shows_with_its_load_and_running_task_and_leaves_when_stopped(fleet):
    sidecar = await fleet.sidecar(ScriptedEngine([Delay(None)]), concurrency=2)
    listed = await fleet.status()
    assert [s["id"] for s in listed["sidecars"]] == [sidecar.id]
    beat = listed["sidecars"][0]
    assert beat["engine"] == "scripted" and beat["state"] == "running" and beat["engineHealthy"] is True
    assert beat["concurrency"] == 2 and (beat["slotsUsed"], beat["slotsFree"]) == (0, 2)
    assert beat["runningTasks"] == [] and beat["host"] and beat["version"] and beat["ttl"] == 2
    assert 0 <= beat["age"] < 60

    async with await CodingClient.connect(fleet.url, naming=fleet.naming) as client:
        handle = await client.submit("wait until cancelled", workspace="ws", events=False)

        async def running() -> dict[str, Any] | None:
            found = (await fleet.status())["sidecars"]
            return found[0] if found and found[0]["runningTasks"] == [handle.task_id] else None

        beat = await wait_until(running, 30, "the task in the sidecar's running tasks")
        assert (beat["slotsUsed"], beat["slotsFree"]) == (1, 1)
        queue = (await fleet.status())["queue"]
        assert queue["ackPending"] == 1 and queue["pending"] == 0 and queue["depth"] == 1
        assert queue["oldestUnacked"]["taskID"] == handle.task_id and "oldestWaiting" not in queue

        await client.cancel(handle.task_id)
        assert (await handle.result(timeout=30)).status == TaskStatus.CANCELLED
        idle = await wait_until(
            lambda: _first_idle(fleet), 30, "the sidecar idle again")
        assert idle["slotsFree"] == 2

    await sidecar.stop(grace=1)
    fleet.sidecars.remove(sidecar)
    # A clean stop deletes the heartbeat: gone at the next look, long before the TTL.
    assert await fleet.sidecar_ids() == set()


async def _first_idle(fleet: Fleet) -> dict[str, Any] | None:
    found = (await fleet.status())["sidecars"]
    return found[0] if found and found[0]["runningTasks"] == [] and found[0]["slotsUsed"] == 0 else None


async def test_a_killed_sidecar_drops_out_within_its_ttl(fleet):
    config = {
        "nats": {"url": fleet.url}, "naming": fleet.naming.model_dump(exclude_none=True),
        "workspace_root": str(fleet.tmp / "workspaces"), "data_dir": str(fleet.tmp / "data"),
        "observability": HEARTBEAT, "shutdown_grace": 2,
    }
    process = ScriptedSidecarProcess.configure(fleet.tmp, "killed", config, fleet.tmp / "runs.jsonl")
    fleet.processes.append(process)
    await process.start()
    ids = await wait_until(fleet.sidecar_ids, 30, "the sidecar process in the fleet")
    assert len(ids) == 1 and str(process.proc.pid) in next(iter(ids))

    await process.kill()  # SIGKILL: no clean stop, nothing deletes the heartbeat
    await wait_until(lambda: _gone(fleet), 30, "the killed sidecar to drop out")
    # It expired with the bucket's max_age: a delete would have left a marker in the bucket's stream.
    bucket = fleet.naming.sidecars_bucket
    with pytest.raises(NotFoundError):
        await fleet.nc.jetstream().get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.{kv_key(next(iter(ids)))}")


async def _gone(fleet: Fleet) -> bool:
    return await fleet.sidecar_ids() == set()


async def test_queue_depth_and_the_oldest_waiting_task_with_no_sidecar(fleet):
    code, out, err = await ocbridge("init", "--nats-url", fleet.url, env=naming_env(fleet.naming))
    assert code == 0, out + err
    tasks = [fleet.task() for _ in range(3)]
    for task in tasks:
        await fleet.publish(task)
    status = await fleet.status()
    assert status["sidecars"] == []
    queue = status["queue"]
    assert queue["stream"] == fleet.naming.stream_name and queue["consumer"] == fleet.naming.consumer_name
    assert (queue["pending"], queue["ackPending"], queue["depth"]) == (3, 0, 3)
    assert queue["oldestWaiting"]["taskID"] == tasks[0]["taskID"]
    assert queue["oldestUnacked"]["taskID"] == tasks[0]["taskID"]
    assert queue["oldestWaiting"]["age"] >= 0 and queue["oldestWaiting"]["enqueued"].endswith("Z")

    code, text, err = await ocbridge("status", "--nats-url", fleet.url, env=naming_env(fleet.naming))
    assert code == 0, err
    assert "SIDECARS (0)" in text and "depth 3: 3 waiting" in text
    assert "oldest waiting: " in text and tasks[0]["taskID"] in text


async def test_status_before_anything_exists_says_what_is_missing(fleet):
    status = await fleet.status()
    assert status["sidecars"] == [] and status["queue"]["depth"] == 0 and status["deadLetters"]["messages"] == 0
    assert any("ocbridge init" in problem for problem in status["queue"]["problems"])


async def test_dead_letters_are_counted(fleet):
    await fleet.sidecar(ScriptedEngine(["done"]))
    await fleet.publish(b"\xff not a task")
    await fleet.publish(b"[1, 2, 3]")

    async def two() -> dict[str, Any] | None:
        status = await fleet.status()
        return status if status["deadLetters"]["messages"] == 2 else None

    status = await wait_until(two, 30, "two dead letters")
    assert status["deadLetters"]["stream"] == fleet.naming.dead_letter_stream
    code, text, _ = await ocbridge("status", "--nats-url", fleet.url, env=naming_env(fleet.naming))
    assert code == 0 and f"DEAD LETTERS  2 (stream {fleet.naming.dead_letter_stream})" in text


async def test_status_with_nats_unreachable_exits_non_zero_with_a_message(tmp_path):
    port = free_port()
    code, out, err = await ocbridge("status", "--json", "--nats-url", f"nats://someone:canary-pw-42@127.0.0.1:{port}",
                                    "--timeout", "2", timeout=30)
    assert code == 2 and out == ""
    assert f"cannot connect to NATS at nats://***@127.0.0.1:{port}" in err
    assert "canary-pw-42" not in err


async def test_a_lost_heartbeat_bucket_is_logged_once_and_never_stops_the_sidecar(fleet, caplog):
    caplog.set_level(logging.INFO, logger="ocbridge.bridge.observability.heartbeat")
    sidecar = await fleet.sidecar(ScriptedEngine(["still working"]))
    heartbeat = sidecar.heartbeat
    assert heartbeat is not None and heartbeat.failures == 0
    await fleet.nc.jetstream().delete_key_value(fleet.naming.sidecars_bucket)  # an operator's mistake
    failures = heartbeat.failures
    await wait_until(lambda: heartbeat.failures >= failures + 4, 30, "four failed beats")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "cannot write" in r.getMessage()]
    assert len(warnings) == 1

    async with await CodingClient.connect(fleet.url, naming=fleet.naming) as client:
        result = await client.run("go on", workspace="ws", wait=30)
    assert result.ok and result.result == "still working"

    # `ocbridge init` puts the bucket back; the sidecar shows again without a restart.
    code, out, err = await ocbridge("init", "--nats-url", fleet.url, env=naming_env(fleet.naming))
    assert code == 0, out + err
    assert await wait_until(fleet.sidecar_ids, 30, "the sidecar back in the fleet") == {sidecar.id}
    assert any("writing again" in r.getMessage() for r in caplog.records)
