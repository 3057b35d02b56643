"""Helpers shared by the integration tests: unique names, sidecar configs, a sidecar process."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest

from ocbridge.bridge.config import BridgeConfig, load_config
from ocbridge.client.client import CodingClient
from ocbridge.client.protocol import Naming

ROOT = Path(__file__).resolve().parents[2]
OCBRIDGE = str(Path(sys.executable).parent / "ocbridge")


def unique_naming() -> Naming:
    """Subjects, stream, consumer and buckets unique to one test, so tests never see each other's tasks."""
    tag = uuid.uuid4().hex[:8]
    return Naming(
        task_subject=f"t{tag}.coding.task",
        stream_prefix=f"t{tag}.coding.stream",
        result_prefix=f"t{tag}.coding.result",
        sessions_bucket=f"sessions-{tag}",
        state_bucket=f"state-{tag}",
        object_store=f"files-{tag}",
        tasks_bucket=f"tasks-{tag}",
        stream_name=f"TASKS_{tag}",
        dead_letter_stream=f"DEAD_{tag}",
        results_stream=f"RESULTS_{tag}",
        consumer_name=f"workers-{tag}",
        # Own leases and heartbeats too: a sidecar of another test that outlived it must not see
        # (and rescue) this test's task leases, nor show in its fleet.
        leases_bucket=f"leases-{tag}",
        sidecars_bucket=f"sidecars-{tag}",
    )


def sidecar_config(nats_url: str, tmp_path: Path, naming: Naming, **overrides) -> BridgeConfig:
    data = {
        "nats": {"url": nats_url},
        "naming": naming.model_dump(),
        "workspace_root": str(tmp_path / "workspaces"),
        "data_dir": str(tmp_path / "data"),
        "offline_model": True,
        "concurrency": 2,
        "jetstream": {"ack_wait": 5, "max_attempts": 2},
        "shutdown_grace": 5,
        "abort_grace": 5,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return load_config(overrides=data, environ={})


class SidecarProcess:
    """``ocbridge serve`` as a child process, for tests that kill it."""

    def __init__(self, config_file: Path, log_file: Path) -> None:
        self.config_file = config_file
        self.log_file = log_file
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, ready_timeout: float = 60.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OCBRIDGE_")}
        log = self.log_file.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            OCBRIDGE, "serve", "--config", str(self.config_file),
            stdout=log, stderr=log, env=env, start_new_session=True,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ready_timeout
        while "ready; workspaces under" not in self.log_file.read_text(errors="replace"):
            if self.proc.returncode is not None or loop.time() > deadline:
                raise RuntimeError(f"sidecar did not start:\n{self.log_file.read_text(errors='replace')[-3000:]}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def require_tools() -> None:
    if not (ROOT / ".tools/npm/node_modules/.bin/opencode").exists() and not shutil.which("opencode"):
        pytest.fail("opencode is not installed: run scripts/setup")


async def settled(client: CodingClient, task_id: str, timeout: float = 30.0) -> None:
    """Return once the sidecar has finished with ``task_id`` (its record is ``done``) and every
    result it published has reached ``client``'s subscriptions.

    The sidecar publishes a result before it marks the record done, on one connection, so by the
    time this reads ``done`` the server has already queued that result to this client (ahead of
    the KV reply); a flush and one loop turn later, the callbacks have run. No sleeping.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        record = await client.task_record(task_id)
        if record is not None and record.state == "done":
            break
        if loop.time() > deadline:
            raise TimeoutError(f"task {task_id} not settled within {timeout}s (record: {record})")
        await asyncio.sleep(0.05)
    await client.nc.flush()
    await asyncio.sleep(0)
