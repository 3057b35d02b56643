"""Faults, on a real nats-server: NATS restarting, a sidecar SIGKILLed, KV buckets unreachable, one
session sent to two sidecars, OpenCode killed. Each test checks the three delivery promises:

- **no task lost**: every task gets a result;
- **none run twice**: the agent's runs are counted (:class:`support.faults.RunLog`, across
  processes); a run that was cut short (its sidecar killed) is redone, every task *ends* once;
- **exactly one result each**: results are kept by a stream over the result subjects
  (:class:`support.faults.ResultLog`, so none is missed while the test's own connection
  reconnects), counted once nothing can publish another (:func:`support.faults.settled`): every
  task message acknowledged, no in-process sidecar still handling a copy, no session lease held.
  No bare sleep decides "nothing more".

The same ``taskID`` published twice, a result over ``max_payload`` and a pre-existing consumer
with other settings are in ``test_delivery.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml

from ocbridge.bridge.jetstream.natsd import EmbeddedNats
from ocbridge.bridge.sidecar import Sidecar
from ocbridge.client.client import CodingClient
from ocbridge.client.protocol import STATION_BUCKET_TTL, Naming
from support.faults import (
    ResultLog,
    RunLog,
    ScriptedSidecarProcess,
    connect_fast,
    publish_task,
    recording_engine,
    settled,
    task_body,
    task_record,
    wait_until,
)
from support.stack import SidecarProcess, require_tools, sidecar_config, unique_naming

#: Small ack_wait (a dead sidecar's task is redelivered fast, progress acks must keep running ones),
#: short give-back delay.
JETSTREAM = {"ack_wait": 2, "max_attempts": 3, "retry_delay": 0.3}


def scripted_sidecar(url: str, tmp: Path, naming: Naming, runs: RunLog, name: str, **overrides) -> Sidecar:
    overrides = {"offline_model": False, "shutdown_grace": 2, **overrides}
    overrides["jetstream"] = {**JETSTREAM, **overrides.get("jetstream", {})}
    return Sidecar(sidecar_config(url, tmp / name, naming, **overrides), engine=recording_engine(runs, name))


async def exactly_one_result_each(results: ResultLog, js, naming: Naming, task_ids: list[str], timeout: float = 60,
                                  *, runs: RunLog | None = None, rerun: set[str] = frozenset(), sidecars=(),
                                  sessions=()) -> dict:
    """Every task has a result; once nothing is left that could publish another, each has exactly
    one, and (with ``runs``) its agent finished once and started once (twice for ``rerun``: runs
    cut short by a killed sidecar). Returns the results."""
    await results.wait_for(task_ids, timeout)
    await settled(js, naming, timeout, sidecars=sidecars, sessions=sessions)
    counts = await results.counts()
    seen = {t: {"results": counts[t]} for t in sorted(set(task_ids) | set(counts))}
    expected = {t: {"results": 1} for t in sorted(task_ids)}
    if runs is not None:
        starts, ends = runs.starts(), runs.ends()
        for t in seen:
            seen[t].update(started=starts[t], finished=ends[t])
        for t in expected:
            expected[t].update(started=2 if t in rerun else 1, finished=1)
    assert seen == expected, "per task: " + ", ".join(f"{t} {v}" for t, v in seen.items() if v != expected.get(t))
    return {task_id: found[0] for task_id, found in (await results.results()).items()}


# ------------------------------------------------------------------------------------ NATS restart


@pytest.mark.slow
@pytest.mark.parametrize("concurrency, tasks, outage", [
    (2, 8, 1.0),  # slots full: four running, four queued
    (4, 4, 1.0),  # free slots: a redelivered copy is fetched at once, while its original runs
    (2, 8, 8.0),  # outlasts the 5 s JetStream request timeout: KV writes and publishes fail meanwhile
], ids=["queued-and-running", "free-slots", "longer-than-request-timeouts"])
async def test_nats_restart_with_tasks_queued_and_running(tmp_path, concurrency, tasks, outage):
    """Two sidecars; NATS stops (SIGTERM) once every slot runs a task, and starts again on the same
    port and store after ``outage`` seconds. NATS redelivers the running tasks' messages as it comes
    back (progress acks are not persisted), to whichever sidecar fetches first: a copy must neither
    run the agent again nor publish a second result. Tasks take 3 to 6 s (staggered), so a slot
    that frees up is offered a copy of a task that another slot still runs."""
    server = EmbeddedNats(tmp_path / "nats", port=0)
    await server.start()
    naming, runs = unique_naming(), RunLog(tmp_path / "runs.jsonl")
    sidecars: list[Sidecar] = []
    nc = await connect_fast(server.url)
    try:
        js = nc.jetstream()
        for name in ("a", "b"):
            sidecar = scripted_sidecar(server.url, tmp_path, naming, runs, name, concurrency=concurrency)
            await sidecar.start()
            sidecars.append(sidecar)
        results = await ResultLog(js, naming).start()
        task_ids = [f"restart-{i}" for i in range(tasks)]
        for i, task_id in enumerate(task_ids):
            await publish_task(js, naming, task_body(naming, task_id, f"{task_id} {3 + i % 4}"))
        running = min(tasks, 2 * concurrency)
        await wait_until(lambda: len(runs.starts()) >= running, 20, f"{running} tasks running")

        await server.stop()
        await asyncio.sleep(outage)  # the outage itself
        await server.start()

        final = await exactly_one_result_each(results, js, naming, task_ids, timeout=120, runs=runs,
                                              sidecars=sidecars)
        assert {t: r.status for t, r in final.items()} == dict.fromkeys(task_ids, "completed")
    finally:
        for sidecar in sidecars:
            await sidecar.stop(grace=2)
        await nc.close()
        await server.stop()


# ---------------------------------------------------------------------------- a sidecar SIGKILLed


@pytest.mark.slow
async def test_sidecar_sigkilled_mid_task_its_tasks_are_redone_once_on_the_other(nats_server, tmp_path):
    """Two sidecar processes (concurrency 2), six 3-second tasks; one sidecar is SIGKILLed while it
    runs two. The survivor, on the same host, sees that the killed one's process is gone: it gives
    those deliveries back at once (ack_wait is 10 minutes here, the wait below 2), takes over their
    task and session leases and runs them again; every task ends once."""
    naming, runs = unique_naming(), RunLog(tmp_path / "runs.jsonl")
    config = {
        "nats": {"url": nats_server.url}, "naming": naming.model_dump(),
        "workspace_root": str(tmp_path / "workspaces"), "concurrency": 2,
        "jetstream": {**JETSTREAM, "ack_wait": 600},
        "shutdown_grace": 2, "log_level": "INFO",
    }
    sidecars = {
        name: ScriptedSidecarProcess.configure(tmp_path, name, {**config, "data_dir": str(tmp_path / f"data-{name}")},
                                               runs.path)
        for name in ("a", "b")
    }
    nc = await connect_fast(nats_server.url)
    try:
        await asyncio.gather(*(s.start() for s in sidecars.values()))
        js = nc.jetstream()
        results = await ResultLog(js, naming).start()
        task_ids = [f"kill-{i}" for i in range(6)]
        for task_id in task_ids:
            await publish_task(js, naming, task_body(naming, task_id, f"{task_id} 3"))
        # Both run two tasks now (concurrency 2 each): kill the one called "a".
        await wait_until(lambda: {e["sidecar"] for e in runs.entries()} == {"a", "b"}, 30, "both sidecars running")
        await sidecars["a"].kill()
        cut_short = {e["marker"] for e in runs.entries() if e["sidecar"] == "a"} - set(runs.ends())
        assert cut_short, "the killed sidecar was running nothing"

        final = await exactly_one_result_each(results, js, naming, task_ids, timeout=100, runs=runs,
                                              rerun=cut_short, sessions=[f"s-{t}" for t in task_ids])
        assert {t: r.status for t, r in final.items()} == dict.fromkeys(task_ids, "completed")
        survivor = str(sidecars["b"].proc.pid)
        survivor_log = sidecars["b"].log_file.read_text(errors="replace")
        for task_id in cut_short:
            record = await task_record(js, naming, task_id)
            assert record.state == "done" and record.attempt == 2 and survivor in record.sidecar, record
            assert f"task {task_id}: its sidecar " in survivor_log and "given back for redelivery now" in survivor_log
    finally:
        await asyncio.gather(*(s.stop() for s in sidecars.values()))
        await nc.close()


@pytest.mark.slow
@pytest.mark.opencode
async def test_sidecar_sigkilled_and_restarted_carries_its_run_on(nats_server, tmp_path):
    """``ocbridge serve`` with the real OpenCode and the offline model is SIGKILLed while its agent
    streams the final answer, after writing the file it was asked for (its OpenCode dies with it).
    Restarted on the same data and workspace directories, as a container restarts, the sidecar sees
    that the task's holder is gone, takes the delivery back at once (ack_wait is 10 minutes) and
    carries the run on from OpenCode's history: the file is not written again, the session holds
    one exchange, the result lists the file among the changes, the task has one result."""
    require_tools()
    naming = unique_naming()
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({
        "nats": {"url": nats_server.url}, "naming": naming.model_dump(),
        "workspace_root": str(tmp_path / "workspaces"), "data_dir": str(tmp_path / "data"),
        "offline_model": True, "concurrency": 1, "jetstream": {**JETSTREAM, "ack_wait": 600},
        "shutdown_grace": 5, "log_level": "INFO",
    }))
    first, second = SidecarProcess(config, tmp_path / "first.log"), SidecarProcess(config, tmp_path / "second.log")
    await first.start()
    client = await CodingClient.connect(nats_server.url, naming=naming)
    try:
        js = client.nc.jetstream()
        results = await ResultLog(js, naming).start()
        written = tmp_path / "workspaces" / "ws-carry" / "carried.txt"
        handle = await client.submit("create carried.txt with content x\nslow 4", workspace="ws-carry",
                                     session="s-carry")
        tool_calls: list[tuple[int | None, str]] = []  # (attempt, tool) of every tool the agent ran
        async for event in handle.events(timeout=120):
            if event.type == "tool_start" and event.tool is not None:
                tool_calls.append((event.attempt, event.tool.name))
            if event.type == "text" and written.exists() and first.proc.returncode is None:
                # The write is done and the final answer streams: kill, restart.
                await first.kill()
                await second.start()

        result = await handle.result(timeout=10)
        assert result.status == "completed", (result.error_type, result.error)
        await exactly_one_result_each(results, js, naming, [handle.task_id], sessions=["s-carry"])
        assert tool_calls == [(1, "write")], "the restarted sidecar's agent wrote the file again"
        assert written.read_text() == "x"
        assert result.session.message_count == 1, result.session
        # Changes count from the first attempt's start: the file it wrote is one of them.
        assert [(c.path, c.status) for c in result.changes or []] == [("carried.txt", "added")], result.changes
        record = await client.task_record(handle.task_id)
        assert record.state == "done" and record.attempt == 2, record
        log = second.log_file.read_text(errors="replace")
        assert "given back for redelivery now" in log
        assert "carries on the run an earlier attempt started" in log
    finally:
        await client.close()
        await asyncio.gather(first.stop(), second.stop())


# ------------------------------------------------------------------------------- KV unreachable


async def test_tasks_bucket_unreachable_at_pickup_the_task_waits_and_runs_once(nats_server, tmp_path):
    """The tasks bucket (task records) is gone when the task is picked up: its record cannot be
    written, so it is given back (never run without a record) until the bucket is back."""
    naming, runs = unique_naming(), RunLog(tmp_path / "runs.jsonl")
    sidecar = scripted_sidecar(nats_server.url, tmp_path, naming, runs, "a")
    await sidecar.start()
    nc = await connect_fast(nats_server.url)
    try:
        js = nc.jetstream()
        results = await ResultLog(js, naming).start()
        await js.delete_key_value(naming.tasks_bucket)
        await publish_task(js, naming, task_body(naming, "kv-tasks", "kv-tasks 0"))

        async def given_back_twice() -> bool:
            info = await js.consumer_info(naming.stream_name, naming.consumer_name)
            return info.num_redelivered >= 1 and info.delivered.consumer_seq >= 3

        await wait_until(given_back_twice, 20, "the task given back twice")
        assert runs.entries() == [] and await results.counts() == Counter()
        await js.create_key_value(bucket=naming.tasks_bucket, history=1,
                                  ttl=sidecar.config.jetstream.task_record_ttl)

        final = await exactly_one_result_each(results, js, naming, ["kv-tasks"], runs=runs, sidecars=[sidecar])
        assert final["kv-tasks"].status == "completed"
        record = await task_record(js, naming, "kv-tasks")
        assert record.state == "done" and record.attempt == 1
    finally:
        await sidecar.stop(grace=2)
        await nc.close()


async def test_sessions_bucket_unreachable_the_task_is_given_back_with_retries_counted(nats_server, tmp_path):
    """The sessions bucket is gone while the task is picked up (its session cannot be recorded):
    not the task's fault, so it is given back after ``jetstream.retry_delay`` with ``retries``
    counted in its record, and runs once when the bucket is back."""
    naming, runs = unique_naming(), RunLog(tmp_path / "runs.jsonl")
    sidecar = scripted_sidecar(nats_server.url, tmp_path, naming, runs, "a")
    await sidecar.start()
    nc = await connect_fast(nats_server.url)
    try:
        js = nc.jetstream()
        results = await ResultLog(js, naming).start()
        await js.delete_key_value(naming.sessions_bucket)
        published = time.monotonic()
        await publish_task(js, naming, task_body(naming, "kv-sessions", "kv-sessions 0"))

        async def retried_twice():
            record = await task_record(js, naming, "kv-sessions")
            return record if record is not None and (record.retries or 0) >= 2 else None

        record = await wait_until(retried_twice, 20, "two give-backs recorded")
        two_give_backs = time.monotonic() - published
        assert record.state == "retrying" and record.result is None
        assert runs.entries() == [] and await results.counts() == Counter()
        await js.create_key_value(bucket=naming.sessions_bucket, history=1, ttl=STATION_BUCKET_TTL)

        final = await exactly_one_result_each(results, js, naming, ["kv-sessions"], runs=runs, sidecars=[sidecar])
        assert final["kv-sessions"].status == "completed"
        record = await task_record(js, naming, "kv-sessions")
        assert record.state == "done" and record.retries >= 2 and record.attempt == record.retries + 1, record
        # Each give-back waited jetstream.retry_delay (0.3 s here), as documented ("Delivery
        # guarantees", "Delivery settings"): two of them take well under the 5 s default.
        assert two_give_backs < 4, f"two give-backs took {two_give_backs:.1f}s with retry_delay 0.3s"
    finally:
        await sidecar.stop(grace=2)
        await nc.close()


# ------------------------------------------------------------------- one session, two sidecars


@pytest.mark.slow
async def test_tasks_of_one_session_on_two_sidecars_never_overlap(nats_server, tmp_path):
    """Four 1-second tasks of one session published at once to two idle sidecars (concurrency 2
    each): both take tasks, the session lease runs them one at a time, and none is redelivered
    while it waits for the lease (ack_wait 2 s, the last waits about 3 s)."""
    naming, runs = unique_naming(), RunLog(tmp_path / "runs.jsonl")
    sidecars = [scripted_sidecar(nats_server.url, tmp_path, naming, runs, name) for name in ("a", "b")]
    for sidecar in sidecars:
        await sidecar.start()
    nc = await connect_fast(nats_server.url)
    try:
        js = nc.jetstream()
        results = await ResultLog(js, naming).start()
        task_ids = [f"same-{i}" for i in range(4)]
        await asyncio.gather(*(
            publish_task(js, naming, task_body(naming, t, f"{t} 1", session="shared", workspace="ws-shared"))
            for t in task_ids
        ))
        final = await exactly_one_result_each(results, js, naming, task_ids, runs=runs, sidecars=sidecars)
        assert {t: r.status for t, r in final.items()} == dict.fromkeys(task_ids, "completed")
        runs_done = runs.intervals()
        assert {sidecar for *_, sidecar in runs_done} == {"a", "b"}, "one sidecar took every task"
        for (_, end, first, _), (start, _, second, _) in itertools.pairwise(runs_done):
            assert end <= start, f"{first} and {second} of one session ran at the same time"
        info = await js.consumer_info(naming.stream_name, naming.consumer_name)
        assert info.num_redelivered == 0
    finally:
        for sidecar in sidecars:
            await sidecar.stop(grace=2)
        await nc.close()


# ------------------------------------------------------------------------------ OpenCode killed


def opencode_servers() -> list[psutil.Process]:
    """``opencode serve`` processes started by this test process (its descendants only)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(child.cmdline())
            if "opencode" in cmdline and " serve" in cmdline:
                found.append(child)
    # The outermost one (a launcher may exec or wrap the real server).
    pids = {p.pid for p in found}
    return [p for p in found if p.ppid() not in pids]


@pytest.mark.slow
@pytest.mark.opencode
async def test_opencode_killed_mid_task_the_run_carries_on_and_completes(nats_server, tmp_path):
    """The real OpenCode with the offline model, in-process sidecar: OpenCode is SIGKILLed while a
    ``slow 5`` prompt streams. The supervisor restarts it and the run carries on there from the
    session's history (no give-back, one attempt): the task completes, with one result."""
    require_tools()
    naming = unique_naming()
    sidecar = Sidecar(sidecar_config(nats_server.url, tmp_path, naming, jetstream={"ack_wait": 5, "retry_delay": 1}))
    await sidecar.start()
    client = await CodingClient.connect(nats_server.url, naming=naming)
    try:
        results = await ResultLog(client.nc.jetstream(), naming).start()
        servers = opencode_servers()
        assert len(servers) == 1, servers
        handle = await client.submit("slow 5\ncreate killed.txt with content x", workspace="ws-oc", session="s-oc")
        async for event in handle.events(timeout=60):
            if event.type == "text":  # the prompt is streaming
                break
        servers[0].send_signal(signal.SIGKILL)

        result = await handle.result(timeout=180)
        assert result.status == "completed", (result.error_type, result.error)
        final = await exactly_one_result_each(results, client.nc.jetstream(), naming, [handle.task_id],
                                             sidecars=[sidecar])
        assert final[handle.task_id].status == "completed"
        assert (tmp_path / "workspaces" / "ws-oc" / "killed.txt").read_text() == "x"
        record = await client.task_record(handle.task_id)
        assert record.state == "done" and not record.retries and record.attempt == 1, record
        assert [p.pid for p in opencode_servers()] != [servers[0].pid], "OpenCode was not restarted"
    finally:
        await client.close()
        await sidecar.stop(grace=5)
