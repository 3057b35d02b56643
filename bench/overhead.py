"""What the bridge adds on top of OpenCode: latency (direct HTTP vs client -> NATS -> sidecar) and memory.

Same OpenCode server, same offline model, same one-tool prompts:
  (a) straight to OpenCode's HTTP API: create a session, POST /session/{id}/message (blocks to the end);
  (b) through the bridge: CodingClient.run() -> NATS JetStream -> sidecar -> OpenCode, new session each.
Both sequential and at concurrency 4. Then tasks in 50 distinct workspaces through the bridge, with the
sidecar's and OpenCode's RSS before, right after, and after the idle directory instances were disposed.

Run: .venv/bin/python bench/overhead.py [--tasks 20] [--workspaces 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bridge.engines.factory import find_tool  # noqa: E402
from bridge.engines.opencode.server import OpenCodeProcess  # noqa: E402
from bridge.engines.opencode.settings import OpenCodeSettings  # noqa: E402
from bridge.natsd import EmbeddedNats  # noqa: E402
from bridge.offline_model.configs import opencode_provider_config  # noqa: E402
from bridge.offline_model.server import OfflineModelServer  # noqa: E402
from client.client import CodingClient  # noqa: E402


def rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Direct:
    """Path (a): the HTTP API, as a caller without the bridge would use it."""

    def __init__(self, url: str, password: str, directory: Path) -> None:
        self.url, self.directory = url, str(directory)
        self.http = aiohttp.ClientSession(
            headers={"Authorization": aiohttp.helpers.BasicAuth("opencode", password).encode()},
            timeout=aiohttp.ClientTimeout(total=120),
        )

    async def run(self, prompt: str) -> float:
        started = time.perf_counter()
        params = {"directory": self.directory}
        async with self.http.post(f"{self.url}/session", params=params, json={"title": "bench"}) as r:
            session = await r.json()
        body = {"parts": [{"type": "text", "text": prompt}]}
        async with self.http.post(f"{self.url}/session/{session['id']}/message", params=params, json=body) as r:
            answer = await r.json()
        if answer.get("info", {}).get("error"):
            raise RuntimeError(answer["info"]["error"])
        return time.perf_counter() - started


async def via_bridge(client: CodingClient, prompt: str, workspace: str) -> float:
    started = time.perf_counter()
    result = await client.run(prompt, workspace=workspace, session=f"b-{uuid.uuid4().hex[:10]}", wait=120)
    if result.status != "completed":
        raise RuntimeError(result.error)
    return time.perf_counter() - started


async def measure(label: str, fn, n: int, concurrency: int) -> list[float]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> float:
        async with gate:
            return await fn(f"create f{uuid.uuid4().hex[:8]}.txt with content {i}")

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def report(rows: list[tuple[str, list[float], list[float]]]) -> None:
    print(f"\n{'mode':14} {'direct p50':>11} {'bridge p50':>11} {'ratio':>6}   {'direct p95':>11} "
          f"{'bridge p95':>11} {'ratio':>6}")
    for label, direct, bridge in rows:
        d50, b50, d95, b95 = (statistics.median(direct), statistics.median(bridge), pct(direct, 0.95),
                              pct(bridge, 0.95))
        print(f"{label:14} {d50 * 1000:9.0f}ms {b50 * 1000:9.0f}ms {b50 / d50:6.2f}   {d95 * 1000:9.0f}ms "
              f"{b95 * 1000:9.0f}ms {b95 / d95:6.2f}")


async def main(tasks: int, workspaces: int, dispose_after: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ocbridge-bench-"))
    nats = EmbeddedNats(tmp / "nats")
    model = OfflineModelServer()
    await nats.start()
    model_url = await model.start()
    opencode = OpenCodeProcess(OpenCodeSettings(
        binary=find_tool("opencode"), state_dir=tmp / "opencode", config=opencode_provider_config(model_url),
        extra_path=[str(Path(sys.executable).parent)],
    ))
    url = await opencode.start()
    root = tmp / "workspaces"
    (root / "bench").mkdir(parents=True)
    config = tmp / "sidecar.yaml"
    config.write_text(yaml.safe_dump({
        "nats": {"url": nats.url}, "workspace_root": str(root), "data_dir": str(tmp / "sidecar"),
        "concurrency": 4, "log_level": "WARNING",
        "opencode": {"url": url, "password": opencode.password, "idle_dispose_seconds": dispose_after},
    }))
    sidecar = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "ocbridge"), "serve", "--config", str(config),
        stderr=(tmp / "sidecar.log").open("wb"),
    )
    client = await CodingClient.connect(nats.url, retry_for=30)
    direct = Direct(url, opencode.password, root / "bench")
    try:
        for _ in range(3):  # warm both paths: directory instance, NATS subjects, sidecar start-up
            await direct.run("create warm.txt with content w")
            await via_bridge(client, "create warm.txt with content w", "bench")
        rows = []
        for label, conc in (("sequential", 1), ("concurrency 4", 4)):
            d = await measure(label, direct.run, tasks, conc)
            b = await measure(label, lambda p: via_bridge(client, p, "bench"), tasks, conc)
            rows.append((label, d, b))
        print(f"OpenCode {opencode.version}, offline model, {tasks} one-tool prompts per mode, same workspace")
        report(rows)

        print(f"\nmemory (RSS, MiB), tasks in {workspaces} distinct workspaces through the bridge:")
        before = (rss_mib(sidecar.pid), rss_mib(opencode.pid))
        started = time.perf_counter()
        for i in range(workspaces):
            await via_bridge(client, "create a.txt with content x", f"ws-{i:03}")
        elapsed = time.perf_counter() - started
        after = (rss_mib(sidecar.pid), rss_mib(opencode.pid))
        await asyncio.sleep(dispose_after + 12)
        disposed = (rss_mib(sidecar.pid), rss_mib(opencode.pid))
        print(f"{'':28} {'sidecar':>8} {'opencode':>9}")
        print(f"{'before':28} {before[0]:8.0f} {before[1]:9.0f}")
        print(f"{'after ' + str(workspaces) + ' workspaces':28} {after[0]:8.0f} {after[1]:9.0f}   "
              f"({elapsed / workspaces * 1000:.0f} ms per task incl. first use of a directory)")
        print(f"{f'after idle dispose ({dispose_after:.0f}s)':28} {disposed[0]:8.0f} {disposed[1]:9.0f}")
    finally:
        await direct.http.close()
        await client.close()
        sidecar.terminate()
        await sidecar.wait()
        await opencode.stop()
        await model.stop()
        await nats.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--workspaces", type=int, default=50)
    parser.add_argument("--dispose-after", type=float, default=10.0, help="idle_dispose_seconds for the sidecar")
    args = parser.parse_args()
    asyncio.run(main(args.tasks, args.workspaces, args.dispose_after))
