"""What a new OpenCode directory instance costs: the first prompt in a directory against the second.

OpenCode loads one instance per ``?directory=`` (config, provider state, tools, file watcher) when a
directory is first used. A sidecar that starts, or whose OpenCode restarts, loads every workspace's
instance again on its next task there; ``bench/faults.py`` pays this twice. For each of
``--directories`` new directories (30 small files each) on one fresh OpenCode server: the first
prompt's wall time and the CPU the server's process tree spent on it, and the second prompt's wall
time (the instance warm), whose ratio is printed. ``--warm`` first reads the directory's
``/config``, ``/provider`` and ``/agent`` (no model call) and prints what that took.

It does this once per ``--catalog`` (default: ``bundled``, OpenCode's own models.dev catalog, as
the baseline, then ``auto``, the empty catalog the sidecar gives a config that defines its providers
itself; see ``bridge/engines/opencode/catalog.py``) and prints the CPU of a cold directory against
the first catalog's. ``--cli N`` adds ``opencode run`` (the ``opencode-cli`` engine), which loads
a cold instance on every run: N runs per catalog, their median wall time and mean CPU.

Run: .venv/bin/python bench/cold_instances.py [--directories 4] [--warm] [--catalog bundled --catalog auto]
     [--cli 5]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

from ocbridge.bridge.engines.base import PromptRequest
from ocbridge.bridge.engines.cli.opencode_cli import OpenCodeCLIEngine, OpenCodeCLISettings
from ocbridge.bridge.engines.opencode.server import OpenCodeProcess
from ocbridge.bridge.engines.opencode.settings import OpenCodeSettings
from ocbridge.bridge.offline_model.configs import opencode_provider_config
from ocbridge.bridge.offline_model.server import OfflineModelServer
from ocbridge.bridge.processes import find_binary


def tree_cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a process and its live descendants (OpenCode's workers), in seconds."""
    if pid is None:
        return 0.0
    root = psutil.Process(pid)
    total = 0.0
    for proc in (root, *root.children(recursive=True)):
        try:
            times = proc.cpu_times()
        except psutil.Error:  # gone meanwhile
            continue
        total += times.user + times.system
    return total


#: Requests that load a directory's instance without a model call.
WARMING_PATHS = ("/config", "/provider", "/agent")


async def main(directories: int, warm: bool, catalogs: list[str], cli_runs: int) -> None:
    model = OfflineModelServer()
    model_url = await model.start()
    try:
        cpu_by_catalog = {catalog: await measure(model_url, directories, warm, catalog) for catalog in catalogs}
        cli = {catalog: await measure_cli(model_url, cli_runs, catalog) for catalog in catalogs} if cli_runs else {}
    finally:
        await model.stop()
    baseline = catalogs[0]
    for catalog, cpu in cpu_by_catalog.items():
        print(f"catalog {catalog!r}: CPU of a cold directory {cpu * 1000:.0f} ms on average, "
              f"{cpu / cpu_by_catalog[baseline]:.2f}x of {baseline!r}")
    for catalog, (wall, cpu) in cli.items():
        base_wall, base_cpu = cli[baseline]
        print(f"catalog {catalog!r}: opencode run median {wall * 1000:.0f} ms ({wall / base_wall:.2f}x), "
              f"CPU {cpu * 1000:.0f} ms per run ({cpu / base_cpu:.2f}x)")


def children_cpu() -> float:
    """User + system CPU of this process's reaped children (the ``opencode run`` processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def measure_cli(model_url: str, runs: int, catalog: str) -> tuple[float, float]:
    """``runs`` one-tool prompts through the ``opencode-cli`` engine, one new session each: the
    median wall time and the mean CPU of a run (seconds)."""
    tmp = Path(tempfile.mkdtemp(prefix="cold-instances-cli-"))
    workspace = tmp / "ws"
    workspace.mkdir()
    engine = OpenCodeCLIEngine(OpenCodeCLISettings(
        binary=find_binary("opencode"), state_dir=tmp / "state", config=opencode_provider_config(model_url),
        extra_path=[str(Path(sys.executable).parent)], models_catalog=catalog,
    ))
    walls: list[float] = []

    async def ignore(_event: object) -> None:
        pass

    try:
        await engine.start()
        cpu_before = children_cpu()
        for index in range(runs):
            handle = await engine.open_session(workspace, f"cli {index}", None)
            begun = time.perf_counter()
            outcome = await engine.run(PromptRequest(workspace, handle.id, f"create c{index}.txt with content {index}"),
                                       ignore)
            walls.append(time.perf_counter() - begun)
            if outcome.error:
                raise RuntimeError(f"opencode run failed: {outcome.error}")
        cpu = (children_cpu() - cpu_before) / runs
    finally:
        await engine.aclose()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"opencode run, catalog {catalog!r}: " + " ".join(f"{w * 1000:.0f}ms" for w in walls))
    return statistics.median(walls), cpu


async def measure(model_url: str, directories: int, warm: bool, catalog: str) -> float:
    """Print one fresh server's figures; return the mean CPU of a cold directory (seconds)."""
    tmp = Path(tempfile.mkdtemp(prefix="cold-instances-"))
    server = OpenCodeProcess(OpenCodeSettings(
        binary=find_binary("opencode"), state_dir=tmp / "opencode", config=opencode_provider_config(model_url),
        extra_path=[str(Path(sys.executable).parent)], models_catalog=catalog,
    ))
    cpus: list[float] = []
    try:
        started = time.perf_counter()
        base = await server.start()
        print(f"OpenCode {server.version}, catalog {catalog!r}: server up after {time.perf_counter() - started:.2f}s")
        auth = {"Authorization": aiohttp.encode_basic_auth("opencode", server.password)}
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(headers=auth, timeout=timeout) as http:

            async def prompt(directory: Path, text: str) -> float:
                params = {"directory": str(directory)}
                begun = time.perf_counter()
                async with http.post(f"{base}/session", params=params, json={}) as response:
                    session_id = (await response.json())["id"]
                async with http.post(f"{base}/session/{session_id}/message", params=params,
                                     json={"parts": [{"type": "text", "text": text}]}) as response:
                    response.raise_for_status()
                    await response.read()
                return time.perf_counter() - begun

            print(f"{'directory':12} {'warming':>9} {'1st prompt':>11} {'its CPU':>9} {'2nd prompt':>11} {'ratio':>6}")
            for index in range(directories):
                directory = tmp / f"ws{index}"
                directory.mkdir()
                for n in range(30):
                    (directory / f"file{n}.txt").write_text("x\n" * n)
                cpu_before, begun = tree_cpu_seconds(server.pid), time.perf_counter()
                if warm:
                    for path in WARMING_PATHS:
                        async with http.get(base + path, params={"directory": str(directory)}) as response:
                            await response.read()
                warming = time.perf_counter() - begun
                first = await prompt(directory, "create a.txt with content 1")
                cpu = tree_cpu_seconds(server.pid) - cpu_before
                cpus.append(cpu)
                second = await prompt(directory, "create b.txt with content 2")
                print(f"{directory.name:12} {warming * 1000:7.0f}ms {first * 1000:9.0f}ms {cpu * 1000:7.0f}ms "
                      f"{second * 1000:9.0f}ms {first / second:6.1f}")
    finally:
        await server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return sum(cpus) / len(cpus)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--directories", type=int, default=4)
    parser.add_argument("--warm", action="store_true", help="read /config, /provider and /agent before the 1st prompt")
    parser.add_argument("--catalog", action="append", dest="catalogs", metavar="CHOICE",
                        help="models_catalog to measure (repeatable; the first is the baseline)")
    parser.add_argument("--cli", type=int, default=0, metavar="N", help="also N opencode run tasks per catalog")
    args = parser.parse_args()
    asyncio.run(main(args.directories, args.warm, args.catalogs or ["bundled", "auto"], args.cli))
