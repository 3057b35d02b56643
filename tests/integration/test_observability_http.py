"""The sidecar's health and metrics listener, over HTTP, on real parts.

- Real tasks on the real OpenCode with the offline model: ``/metrics`` counts what the test did
  (completed, failed, timed out, cancelled; tokens equal to the sum of the results' usage).
- ``/readyz`` answers 503 naming what is missing while NATS is stopped (the test's own
  nats-server, started again on the same port and store) or OpenCode is killed (its supervisor
  restarts it), and 200 again once each is back; ``/healthz`` says 200 throughout.
- The listener binds loopback by default, and is off when no port is configured.

Every wait polls with a deadline; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ocbridge.bridge.engines.scripted import ScriptedEngine
from ocbridge.bridge.jetstream.natsd import EmbeddedNats
from ocbridge.bridge.jetstream.setup import ensure_task_stream
from ocbridge.bridge.observability.metrics import NO_METRICS
from ocbridge.bridge.sidecar import Sidecar
from ocbridge.client.client import CodingClient
from ocbridge.client.protocol import TaskResult
from support.stack import require_tools, settled, sidecar_config, unique_naming

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return resp.status, await resp.text()


async def scrape(http: aiohttp.ClientSession, sidecar: Sidecar) -> Samples:
    """``(sample name, sorted labels) -> value`` of the sidecar's ``/metrics``."""
    status, body = await get(http, f"{sidecar.http.url}/metrics")
    assert status == 200, body
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


async def readiness_becomes(http: aiohttp.ClientSession, sidecar: Sidecar, status: int, timeout: float) -> dict:
    """Poll ``/readyz`` until it answers ``status``; its JSON body."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        async with http.get(f"{sidecar.http.url}/readyz", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            last = (resp.status, await resp.json())
        if last[0] == status:
            return last[1]
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz did not answer {status} within {timeout:.0f}s (last: {last})")
        await asyncio.sleep(0.05)


def listening_address(port: int) -> str:
    """The local address of this process's listening TCP socket on ``port`` (what ``ss -ltn`` shows)."""
    found = [c.laddr.ip for c in psutil.Process().net_connections(kind="tcp")
             if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert len(found) == 1, found
    return found[0]


def by_status(samples: Samples, name: str) -> dict[str, float]:
    """A histogram's ``_count`` per ``status`` label."""
    return {dict(labels)["status"]: value for (sample, labels), value in samples.items() if sample == name}


AGENT_EVENTS = {"text", "thinking", "tool_start"}


async def follow(handle, cancel_on_text: bool = False) -> tuple[TaskResult, set[str]]:
    """Every event type of the task (cancelling it at its first text when asked) and its result."""
    types: set[str] = set()
    async for event in handle.events(timeout=120):
        types.add(event.type)
        if cancel_on_text and event.type == "text" and "cancel sent" not in types:
            types.add("cancel sent")
            await handle.cancel()
    return await handle.result(timeout=10), types


@pytest.mark.opencode
@pytest.mark.slow
async def test_metrics_and_readiness_follow_real_tasks_and_outages(tmp_path):
    require_tools()
    server = EmbeddedNats(tmp_path / "nats", port=0)
    await server.start()
    naming = unique_naming()
    config = sidecar_config(server.url, tmp_path, naming, concurrency=3, observability={"http_port": 0},
                            jetstream={"ack_wait": 5, "retry_delay": 1})
    sidecar = Sidecar(config)
    client: CodingClient | None = None
    http = aiohttp.ClientSession()
    try:
        await sidecar.start()
        assert sidecar.http is not None and sidecar.http.port > 0
        assert sidecar.http.host == "127.0.0.1" and listening_address(sidecar.http.port) == "127.0.0.1"
        assert await get(http, f"{sidecar.http.url}/healthz") == (200, '{"status": "alive"}')
        body = await readiness_becomes(http, sidecar, 200, timeout=30)
        assert body == {"ready": True, "checks": {"nats": True, "consumer": True, "engine": True}}

        # ------------------------------------------------------------ real tasks, counted
        client = await CodingClient.connect(server.url, naming=naming)
        submitted = {
            "completed-1": ("create a.txt with content A", {}),
            "completed-2": ("think about it\nsay hello", {}),
            "failed": ("fail 400", {}),
            "timeout": ("slow 20", {"timeout": 2}),
            "cancelled": ("slow 20", {}),
        }
        handles = {name: await client.submit(prompt, workspace=f"ws-{name}", session=f"s-{name}", **extra)
                   for name, (prompt, extra) in submitted.items()}
        followed = await asyncio.gather(*(follow(h, cancel_on_text=name == "cancelled")
                                          for name, h in handles.items()))
        outcomes = dict(zip(handles, followed, strict=True))
        for handle in handles.values():
            await settled(client, handle.task_id)
        results = {name: result for name, (result, _) in outcomes.items()}
        assert {name: r.status for name, r in results.items()} == {
            "completed-1": "completed", "completed-2": "completed", "failed": "error", "timeout": "timeout",
            "cancelled": "cancelled"}

        seen = await scrape(http, sidecar)
        total = sum(results[name].metrics.prompt_tokens for name in results)
        assert total > 0
        assert seen[("ocbridge_tokens_total", (("type", "input"),))] == total
        assert seen[("ocbridge_tokens_total", (("type", "output"),))] == sum(
            r.metrics.completion_tokens for r in results.values())
        cost = sum(r.metrics.cost or 0 for r in results.values())
        assert seen[("ocbridge_cost_usd_total", ())] == pytest.approx(cost)
        counters = {name: seen[(f"ocbridge_tasks_{name}_total", ())]
                    for name in ("completed", "cancelled", "timed_out", "retried")}
        assert counters == {"completed": 2, "cancelled": 1, "timed_out": 1, "retried": 0}
        assert seen[("ocbridge_tasks_failed_total", (("error_type", results["failed"].error_type),))] == 1
        # Each message delivered once, or more (a redelivery is counted as one).
        assert seen[("ocbridge_tasks_received_total", ())] - seen[("ocbridge_redeliveries_total", ())] == 5
        assert by_status(seen, "ocbridge_task_duration_seconds_count") == {
            "completed": 2, "error": 1, "timeout": 1, "cancelled": 1}
        assert {dict(labels).get("engine") for (name, labels) in seen if name.startswith("ocbridge_task_duration")} \
            == {"opencode"}
        assert seen[("ocbridge_queue_wait_seconds_count", ())] == 5
        with_agent_events = sum(1 for _, types in outcomes.values() if types & AGENT_EVENTS)
        assert seen[("ocbridge_time_to_first_event_seconds_count", (("engine", "opencode"),))] == with_agent_events
        assert seen[("ocbridge_tasks_active", ())] == 0 and seen[("ocbridge_slots_free", ())] == 3
        assert seen[("ocbridge_opencode_restarts_total", ())] == 0
        assert seen[("ocbridge_opencode_rss_bytes", ())] > 10 * 2**20  # a real process tree, tens of MB
        assert seen[("ocbridge_dead_letters_total", ())] == 0

        # ------------------------------------------------------------ NATS goes away and back
        await client.close()
        client = None
        await server.stop()
        body = await readiness_becomes(http, sidecar, 503, timeout=30)
        assert "nats" in body["missing"] and body["checks"]["engine"] is True
        assert (await get(http, f"{sidecar.http.url}/healthz"))[0] == 200  # alive all along
        await server.start()  # same port, same store
        await readiness_becomes(http, sidecar, 200, timeout=60)

        # ------------------------------------------------------------ OpenCode killed mid-task
        client = await CodingClient.connect(server.url, naming=naming)
        handle = await client.submit("slow 5\ncreate killed.txt with content x", workspace="ws-oc", session="s-oc")
        async for event in handle.events(timeout=60):
            if event.type == "text":  # the prompt is streaming
                break
        assert sidecar.engine.process is not None
        psutil.Process(sidecar.engine.process.pid).send_signal(signal.SIGKILL)
        body = await readiness_becomes(http, sidecar, 503, timeout=30)
        assert body["missing"] == ["engine"], body
        await readiness_becomes(http, sidecar, 200, timeout=120)
        result = await handle.result(timeout=180)
        assert result.status == "completed", (result.error_type, result.error)
        await settled(client, handle.task_id)
        record = await client.task_record(handle.task_id)

        seen = await scrape(http, sidecar)
        assert seen[("ocbridge_opencode_restarts_total", ())] == 1
        # The run carried on with the new server: neither given back nor failed, one attempt.
        assert seen[("ocbridge_tasks_retried_total", ())] == 0 and not record.retries and record.attempt == 1
        assert seen[("ocbridge_tasks_completed_total", ())] == 3
        assert seen[("ocbridge_tokens_total", (("type", "input"),))] == total + result.metrics.prompt_tokens
        assert seen[("ocbridge_opencode_rss_bytes", ())] > 10 * 2**20  # the new server's tree
    finally:
        await http.close()
        if client is not None:
            await client.close()
        await sidecar.stop(grace=5)
        await server.stop()
    assert sidecar.http is None  # the listener stopped with the sidecar


async def test_consumer_readiness_flips_when_the_task_stream_is_gone_and_back(nats_server, tmp_path):
    """Scripted engine (no OpenCode needed): the task stream, and with it the durable consumer, is
    deleted. ``/readyz`` says the consumer is missing until the stream exists again, then the
    worker binds a new consumer by itself, says ready, and runs a task."""
    naming = unique_naming()
    config = sidecar_config(nats_server.url, tmp_path, naming, offline_model=False,
                            observability={"http_port": 0})
    sidecar = Sidecar(config, engine=ScriptedEngine(["done"]))
    http = aiohttp.ClientSession()
    client = await CodingClient.connect(nats_server.url, naming=naming)
    try:
        await sidecar.start()
        await readiness_becomes(http, sidecar, 200, timeout=30)
        js = client.nc.jetstream()
        await js.delete_stream(naming.stream_name)
        body = await readiness_becomes(http, sidecar, 503, timeout=30)
        assert body["missing"] == ["consumer"], body
        await ensure_task_stream(js, naming, config.jetstream)
        await readiness_becomes(http, sidecar, 200, timeout=30)
        result = await client.run("hello", workspace="ws-back", wait=30)
        assert result.status == "completed"
        await settled(client, result.task_id)
        seen = await scrape(http, sidecar)
        assert seen[("ocbridge_tasks_completed_total", ())] == 1
    finally:
        await http.close()
        await client.close()
        await sidecar.stop(grace=2)


async def test_metrics_and_listener_are_off_unless_configured(nats_server, tmp_path):
    """No port configured: no metrics recorded, and none of the ports the sidecar opens (it may
    serve other things) answers /healthz."""
    naming = unique_naming()
    sidecar = Sidecar(sidecar_config(nats_server.url, tmp_path, naming, offline_model=False),
                      engine=ScriptedEngine(["done"]))

    def listening() -> set[int]:
        return {c.laddr.port for c in psutil.Process().net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}

    before = listening()
    try:
        await sidecar.start()
        assert sidecar.http is None and sidecar.metrics is NO_METRICS
        async with aiohttp.ClientSession() as http:
            for port in listening() - before:
                status, _ = await get(http, f"http://127.0.0.1:{port}/healthz")
                assert status != 200, port
    finally:
        await sidecar.stop(grace=2)
