"""Several sidecars on one NATS: each task runs exactly once; a killed sidecar's task is redelivered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from ocbridge.client.client import CodingClient
from support.stack import SidecarProcess, settled, unique_naming

pytestmark = [pytest.mark.opencode, pytest.mark.slow]


def write_config(path: Path, nats_url: str, naming, root: Path, data: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "nats": {"url": nats_url},
        "naming": naming.model_dump(),
        "workspace_root": str(root),
        "data_dir": str(data),
        "offline_model": True,
        "concurrency": 2,
        "jetstream": {"ack_wait": 2, "max_attempts": 3},
        "shutdown_grace": 5,
        "log_level": "INFO",
    }))
    return path


@pytest.fixture
async def two_sidecars(nats_server, tmp_path):
    naming = unique_naming()
    root = tmp_path / "workspaces"  # shared, like a volume mounted into both containers
    sidecars = [
        SidecarProcess(write_config(tmp_path / f"s{i}.yaml", nats_server.url, naming, root, tmp_path / f"data{i}"),
                       tmp_path / f"s{i}.log")
        for i in range(2)
    ]
    await asyncio.gather(*(s.start() for s in sidecars))
    client = await CodingClient.connect(nats_server.url, naming=naming)
    try:
        yield sidecars, client, root
    finally:
        await client.close()
        await asyncio.gather(*(s.stop() for s in sidecars))


async def test_twenty_tasks_on_two_sidecars_run_exactly_once(two_sidecars):
    sidecars, client, root = two_sidecars
    handles = [
        await client.submit(f"run echo ran >> ran.log\ncreate out.txt with content {i}",
                            workspace=f"ws-{i}", session=f"s-{i}")
        for i in range(20)
    ]
    results = await asyncio.gather(*(h.result(timeout=120) for h in handles))
    assert all(r.status == "completed" for r in results), [r.error for r in results if r.status != "completed"]
    for i in range(20):
        assert (root / f"ws-{i}" / "ran.log").read_text() == "ran\n"
        assert (root / f"ws-{i}" / "out.txt").read_text() == str(i)
    # Exactly one result each: a late duplicate would show up as a second message on the subject.
    runners = {(await client.task_record(h.task_id)).sidecar for h in handles}
    pids = {str(s.proc.pid) for s in sidecars}
    assert {r.split("-")[-2] for r in runners} == pids, "both sidecars should have taken tasks"


async def test_sidecar_killed_mid_task_its_task_completes_on_the_other(two_sidecars):
    sidecars, client, root = two_sidecars
    handle = await client.submit("slow 4\ncreate survived.txt with content yes", workspace="ws-kill",
                                 session="s-kill")
    results = []

    async def on_result(msg):
        results.append(msg.data)

    sub = await client.nc.subscribe(handle.result_subject, cb=on_result)
    async for event in handle.events(timeout=60):
        if event.type == "prompt_sent":
            break
    record = await client.task_record(handle.task_id)
    victim = next(s for s in sidecars if str(s.proc.pid) == record.sidecar.split("-")[-2])
    await victim.kill()

    result = await handle.result(timeout=90)
    await settled(client, handle.task_id)  # a duplicate result would have arrived by now
    await sub.unsubscribe()
    assert result.status == "completed", result.error
    assert (root / "ws-kill" / "survived.txt").read_text() == "yes"
    assert len(results) == 1
    record = await client.task_record(handle.task_id)
    assert record.attempt == 2 and str(victim.proc.pid) not in record.sidecar
    # The killed sidecar's OpenCode did not outlive it (PDEATHSIG: the kernel kills it at once).
    victim_data = yaml.safe_load(victim.config_file.read_text())["data_dir"]
    leftovers = [
        p for p in Path("/proc").iterdir()
        if p.name.isdigit() and _cmdline(p).startswith("opencode") and f"HOME={victim_data}" in _environ(p)
    ]
    assert not leftovers


def _cmdline(proc: Path) -> str:
    try:
        return Path(proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split("/")[-1]
    except OSError:
        return ""


def _environ(proc: Path) -> str:
    try:
        return Path(proc / "environ").read_bytes().decode(errors="replace")
    except OSError:
        return ""
