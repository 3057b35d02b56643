"""Sidecar lifecycle: first connect retried, graceful SIGTERM, hand-back, bounded redelivery."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import yaml

from ocbridge.bridge.jetstream.natsd import EmbeddedNats, free_port
from ocbridge.bridge.sidecar import Sidecar
from ocbridge.client.client import CodingClient
from support.stack import OCBRIDGE, SidecarProcess, sidecar_config, unique_naming

pytestmark = [pytest.mark.opencode, pytest.mark.slow]


def process_config(tmp_path, name: str, nats_url: str, naming, **extra) -> SidecarProcess:
    data = {
        "nats": {"url": nats_url},
        "naming": naming.model_dump(),
        "workspace_root": str(tmp_path / "workspaces"),
        "data_dir": str(tmp_path / f"data-{name}"),
        "offline_model": True,
        "concurrency": 1,
        "jetstream": {"ack_wait": 2, "max_attempts": 3},
        "shutdown_grace": 10,
    }
    for key, value in extra.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return SidecarProcess(path, tmp_path / f"{name}.log")


async def wait_for_prompt(handle) -> None:
    async for event in handle.events(timeout=60):
        if event.type == "prompt_sent":
            return
    raise AssertionError("the task ended before its prompt was sent")


async def test_first_connect_is_retried_until_nats_comes_up(tmp_path, caplog):
    port = free_port()
    naming = unique_naming()
    sidecar = Sidecar(sidecar_config(f"nats://127.0.0.1:{port}", tmp_path, naming))
    starting = asyncio.create_task(sidecar.start())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    # Wait for several failed connection attempts, then check the sidecar is still trying.
    while sum("Connect call failed" in r.getMessage() for r in caplog.records) < 3:
        assert not starting.done() and loop.time() < deadline, "the sidecar gave up while NATS was down"
        await asyncio.sleep(0.1)
    assert not starting.done(), "the sidecar gave up while NATS was down"
    async with EmbeddedNats(tmp_path / "late-nats", port=port) as nats:
        await asyncio.wait_for(starting, 30)
        try:
            async with await CodingClient.connect(nats.url, naming=naming) as client:
                result = await client.run("create late.txt with content ok", workspace="late", wait=60)
            assert result.status == "completed"
        finally:
            await sidecar.stop(grace=5)


async def test_sigterm_lets_a_running_task_finish(nats_server, tmp_path):
    naming = unique_naming()
    sidecar = process_config(tmp_path, "a", nats_server.url, naming)
    await sidecar.start()
    async with await CodingClient.connect(nats_server.url, naming=naming) as client:
        handle = await client.submit("slow 2\ncreate graceful.txt with content done", workspace="g", session="g")
        await wait_for_prompt(handle)
        sidecar.proc.send_signal(signal.SIGTERM)
        result = await handle.result(timeout=30)
        assert result.status == "completed"
        assert await asyncio.wait_for(sidecar.proc.wait(), 30) == 0
    assert (tmp_path / "workspaces" / "g" / "graceful.txt").read_text() == "done"


async def test_sigterm_past_grace_hands_the_task_back_and_queued_tasks_wait(nats_server, tmp_path):
    naming = unique_naming()
    first = process_config(tmp_path, "a", nats_server.url, naming, shutdown_grace=1)
    await first.start()
    async with await CodingClient.connect(nats_server.url, naming=naming) as client:
        handle = await client.submit("slow 6\ncreate handed.txt with content back", workspace="h", session="h")
        await wait_for_prompt(handle)
        first.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.proc.wait(), 30) == 0
        assert not handle.done
        record = await client.task_record(handle.task_id)
        assert record.state == "requeued"
        # Published while no sidecar runs: it waits in the stream instead of being lost.
        queued = await client.submit("create queued.txt with content waited", workspace="q", session="q")

        second = process_config(tmp_path, "b", nats_server.url, naming)
        await second.start()
        try:
            result = await handle.result(timeout=60)
            assert result.status == "completed"
            assert (await client.task_record(handle.task_id)).attempt == 2
            assert (await queued.result(timeout=60)).status == "completed"
        finally:
            await second.stop()
    assert (tmp_path / "workspaces" / "h" / "handed.txt").read_text() == "back"
    assert (tmp_path / "workspaces" / "q" / "queued.txt").read_text() == "waited"


async def test_task_that_keeps_killing_sidecars_ends_with_an_error_result(nats_server, tmp_path):
    naming = unique_naming()
    first = process_config(tmp_path, "a", nats_server.url, naming, jetstream={"max_attempts": 1})
    await first.start()
    async with await CodingClient.connect(nats_server.url, naming=naming) as client:
        handle = await client.submit("slow 10", workspace="k", session="k")
        await wait_for_prompt(handle)
        await first.kill()
        second = process_config(tmp_path, "b", nats_server.url, naming, jetstream={"max_attempts": 1})
        await second.start()
        try:
            result = await handle.result(timeout=60)
        finally:
            await second.stop()
    assert result.status == "error"
    assert result.error_type == "redelivery_exhausted"


async def test_task_submitted_before_any_sidecar_ever_ran_waits_for_one(nats_server, tmp_path):
    naming = unique_naming()
    async with await CodingClient.connect(nats_server.url, naming=naming) as client:
        early = await client.submit("create early.txt with content first", workspace="early", session="early")
        sidecar = process_config(tmp_path, "late", nats_server.url, naming)
        await sidecar.start()
        try:
            assert (await early.result(timeout=60)).status == "completed"
        finally:
            await sidecar.stop()
    assert (tmp_path / "workspaces" / "early" / "early.txt").read_text() == "first"


async def test_sigterm_stops_a_sidecar_still_waiting_for_its_first_nats_connection(tmp_path):
    sidecar = process_config(tmp_path, "waiting", f"nats://127.0.0.1:{free_port()}", unique_naming())
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCBRIDGE_")}
    with sidecar.log_file.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            OCBRIDGE, "serve", "--config", str(sidecar.config_file), stdout=log, stderr=log, env=env,
            start_new_session=True,
        )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while "Connect call failed" not in sidecar.log_file.read_text(errors="replace"):
            assert proc.returncode is None and loop.time() < deadline, sidecar.log_file.read_text()[-2000:]
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert "signal received while starting" in sidecar.log_file.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
