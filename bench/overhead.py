"""What the bridge adds on top of OpenCode: latency (direct HTTP vs client -> NATS -> sidecar) and memory.

Same OpenCode server, same offline model, same one-tool prompts:
  (a) straight to OpenCode's HTTP API: create a session, POST /session/{id}/message (blocks to the end);
  (b) through the bridge: CodingClient.run() -> NATS JetStream -> sidecar -> OpenCode, new session each.
Sequentially and at concurrency 4 (``--tasks`` each), then at concurrency 8 (``--throughput-tasks``,
in alternating chunks of 20: direct, bridge, bridge, direct, direct, bridge..., so that a drift in the
machine's load hits both paths alike; the ratio of each neighbouring pair is printed too), with the
sidecar's own concurrency at 8. Latency p50/p95 for each mode, and throughput (tasks per second of
wall time) with its bridge / direct ratio. Then the cost of
observability: the bridge path on two sidecars side by side, one plain and one with tracing and
metrics on (OTLP over HTTP to a collector stub run by this harness, spans and metrics every second,
``/metrics`` scraped every second as Prometheus would), sequentially in alternating chunks; goal:
p50 with observability on within 1.05x of off. Then tasks in 50 distinct workspaces through the
bridge, with the sidecar's and OpenCode's RSS before, right after, and after the idle directory
instances were disposed.

Run: .venv/bin/python bench/overhead.py [--tasks 20] [--throughput-tasks 80] [--observed-tasks 40] (0 skips a part)
     [--workspaces 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import psutil
import yaml
from aiohttp import web

from ocbridge.bridge.engines.opencode.server import OpenCodeProcess
from ocbridge.bridge.engines.opencode.settings import OpenCodeSettings
from ocbridge.bridge.jetstream.natsd import EmbeddedNats
from ocbridge.bridge.offline_model.configs import opencode_provider_config
from ocbridge.bridge.offline_model.server import OfflineModelServer
from ocbridge.bridge.processes import find_binary
from ocbridge.client.client import CodingClient
from ocbridge.client.protocol import Naming

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:  # gone meanwhile
            continue
    return total / 2**20


def cpu_seconds(pid: int | None, tree: bool = True) -> float:
    """User + system CPU time of a process (and its live descendants with ``tree``), in seconds."""
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *(root.children(recursive=True) if tree else ())]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:  # gone meanwhile
            continue
        total += times.user + times.system
    return total


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Direct:
    """Path (a): the HTTP API, as a caller without the bridge would use it."""

    def __init__(self, url: str, password: str, directory: Path) -> None:
        self.url, self.directory = url, str(directory)
        self.http = aiohttp.ClientSession(
            headers={"Authorization": aiohttp.encode_basic_auth("opencode", password)},
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


async def measure(label: str, fn, n: int, concurrency: int) -> tuple[list[float], float]:
    """Latencies of ``n`` prompts run ``concurrency`` at a time, and the wall time of them all."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> float:
        async with gate:
            return await fn(f"create f{uuid.uuid4().hex[:8]}.txt with content {i}")

    started = time.perf_counter()
    latencies = list(await asyncio.gather(*(one(i) for i in range(n))))
    return latencies, time.perf_counter() - started


def report(rows: list[tuple[str, list[float], list[float]]], throughput: list[tuple[str, float, float]]) -> None:
    print(f"\n{'mode':14} {'direct p50':>11} {'bridge p50':>11} {'ratio':>6}   {'direct p95':>11} "
          f"{'bridge p95':>11} {'ratio':>6}")
    for label, direct, bridge in rows:
        d50, b50, d95, b95 = (statistics.median(direct), statistics.median(bridge), pct(direct, 0.95),
                              pct(bridge, 0.95))
        print(f"{label:14} {d50 * 1000:9.0f}ms {b50 * 1000:9.0f}ms {b50 / d50:6.2f}   {d95 * 1000:9.0f}ms "
              f"{b95 * 1000:9.0f}ms {b95 / d95:6.2f}")
    print(f"\n{'throughput':14} {'direct':>11} {'bridge':>11} {'ratio':>6}   (bridge / direct, goal >= 0.95)")
    for label, direct_tps, bridge_tps in throughput:
        print(f"{label:14} {direct_tps:9.2f}/s {bridge_tps:9.2f}/s {bridge_tps / direct_tps:6.2f}")


class CollectorStub:
    """An OTLP/HTTP receiver that accepts traces and metrics and counts the requests (no decoding)."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.received = 0

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests[request.path] = self.requests.get(request.path, 0) + 1
        self.received += len(body)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/traces", self._receive)
        app.router.add_post("/v1/metrics", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        await self._runner.cleanup()


class Stack:
    """NATS, one OpenCode and one ``ocbridge serve`` subprocess connected to it (with ``collector``,
    tracing and metrics on: OTLP to it, and the ``/metrics`` listener on a free port)."""

    def __init__(
        self, tmp: Path, nats: EmbeddedNats, model_url: str, dispose_after: float, collector: str | None = None,
        opencode: OpenCodeProcess | None = None, observe: str = "traces,metrics",
    ) -> None:
        self.tmp, self.nats, self.model_url, self.dispose_after = tmp, nats, model_url, dispose_after
        self.collector = collector
        self.observe = observe
        #: A running OpenCode to share (it is then neither started nor stopped here).
        self.shared_opencode = opencode
        self.root = tmp / "workspaces"
        self.metrics_url: str | None = None

    def _environment(self) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
        if self.collector:
            env.update({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": self.collector})
            if "traces" in self.observe:
                env.update({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_SCHEDULE_DELAY": "1000"})
            if "metrics" in self.observe:
                env.update({"OTEL_METRICS_EXPORTER": "otlp", "OTEL_METRIC_EXPORT_INTERVAL": "1000",
                            "OCBRIDGE_HTTP_PORT": "0"})
        return env

    async def _find_metrics_url(self) -> str:
        async with asyncio.timeout(30):
            while True:
                found = re.search(r"(http://127\.0\.0\.1:\d+) \(/healthz", self.log.read_text(errors="replace"))
                if found:
                    return found.group(1) + "/metrics"
                await asyncio.sleep(0.1)

    async def __aenter__(self) -> Stack:
        if self.shared_opencode is not None:
            self.opencode = self.shared_opencode
            self.url = self.opencode.url
        else:
            self.opencode = OpenCodeProcess(OpenCodeSettings(
                binary=find_binary("opencode"), state_dir=self.tmp / "opencode",
                config=opencode_provider_config(self.model_url), extra_path=[str(Path(sys.executable).parent)],
            ))
            self.url = await self.opencode.start()
        (self.root / "bench").mkdir(parents=True)
        config = self.tmp / "sidecar.yaml"
        config.write_text(yaml.safe_dump({
            "nats": {"url": self.nats.url}, "workspace_root": str(self.root), "data_dir": str(self.tmp / "sidecar"),
            "concurrency": 8, "log_level": "INFO",
            "naming": {"task_subject": f"bench.{self.tmp.name}.task", "stream_name": f"B_{self.tmp.name}",
                       "consumer_name": f"b-{self.tmp.name}", "sessions_bucket": f"s-{self.tmp.name}",
                       "tasks_bucket": f"t-{self.tmp.name}", "state_bucket": f"st-{self.tmp.name}"},
            "opencode": {"url": self.url, "password": self.opencode.password,
                         "idle_dispose_seconds": self.dispose_after},
        }))
        self.log = self.tmp / "sidecar.log"
        self.sidecar = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "ocbridge"), "serve", "--config", str(config), stderr=self.log.open("wb"),
            env=self._environment(),
        )
        naming = Naming(task_subject=f"bench.{self.tmp.name}.task", tasks_bucket=f"t-{self.tmp.name}",
                        stream_name=f"B_{self.tmp.name}",
                        sessions_bucket=f"s-{self.tmp.name}", state_bucket=f"st-{self.tmp.name}")
        try:
            self.client = await CodingClient.connect(self.nats.url, naming=naming, retry_for=30)
            await via_bridge(self.client, "create warm.txt with content w", "bench")  # waits for the sidecar
            if self.collector and "metrics" in self.observe:
                self.metrics_url = await self._find_metrics_url()
        except BaseException:
            self.sidecar.terminate()
            await self.sidecar.wait()
            if self.shared_opencode is None:
                await self.opencode.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()
        self.sidecar.terminate()
        await self.sidecar.wait()
        if self.shared_opencode is None:
            await self.opencode.stop()


async def latency(tmp: Path, nats: EmbeddedNats, model_url: str, tasks: int, throughput_tasks: int) -> None:
    async with Stack(tmp, nats, model_url, 300) as stack:
        direct = Direct(stack.url, stack.opencode.password, stack.root / "bench")

        def bridge(prompt: str):
            return via_bridge(stack.client, prompt, "bench")

        try:
            for _ in range(3):  # warm both paths: directory instance, NATS subjects, sidecar start-up
                await direct.run("create warm.txt with content w")
                await bridge("create warm.txt with content w")
            rows, throughput = [], []
            for label, conc in (("sequential", 1), ("concurrency 4", 4)):
                d, d_wall = await measure(label, direct.run, tasks, conc)
                b, b_wall = await measure(label, bridge, tasks, conc)
                rows.append((label, d, b))
                throughput.append((label, tasks / d_wall, tasks / b_wall))
            # Concurrency 8 in chunks of 20: direct, bridge, bridge, direct, direct, bridge... (a
            # load drift during the run then costs both paths alike); throughput = all tasks / the
            # summed wall time of each path, and per neighbouring pair of chunks, to show the spread.
            # CPU of each process per task, to tell where a throughput gap goes (2 cores: at
            # concurrency 8 the CPU is the limit, so the bridge's own CPU is what it costs).
            chunks = max(throughput_tasks // 20, 1)
            chunk = max(throughput_tasks // chunks, 1)
            order = [(direct.run, bridge, bridge, direct.run)[i % 4] for i in range(2 * chunks)]
            d, b, d_wall, b_wall = [], [], 0.0, 0.0
            pair_ratios: list[float] = []
            # (pid, with its descendants): the harness alone, as OpenCode, the sidecar and nats-server
            # are its children.
            pids = {"opencode": (stack.opencode.pid, True), "sidecar": (stack.sidecar.pid, True),
                    "nats-server": (nats.pid, True), "harness (client + model)": (os.getpid(), False)}
            cpu = {path: dict.fromkeys(pids, 0.0) for path in ("direct", "bridge")}
            walls: dict[str, float] = {}
            for index, fn in enumerate(order):
                path = "bridge" if fn is bridge else "direct"
                before = {name: cpu_seconds(*proc) for name, proc in pids.items()}
                lat, wall = await measure("concurrency 8", fn, chunk, 8)
                for name, proc in pids.items():
                    cpu[path][name] += cpu_seconds(*proc) - before[name]
                if fn is bridge:
                    b, b_wall = b + lat, b_wall + wall
                else:
                    d, d_wall = d + lat, d_wall + wall
                walls[path] = wall
                if index % 2:  # a direct and a bridge chunk side by side
                    pair_ratios.append(walls["direct"] / walls["bridge"])
            rows.append(("concurrency 8", d, b))
            throughput.append(("concurrency 8", len(d) / d_wall, len(b) / b_wall))
            print(f"OpenCode {stack.opencode.version}, offline model, one-tool prompts, same workspace, new session "
                  f"each; {tasks} per path sequentially and at concurrency 4, {len(d)} at concurrency 8; "
                  "sidecar concurrency 8")
            report(rows, throughput)
            print(f"  concurrency 8, bridge / direct per pair of neighbouring chunks of {chunk}: "
                  + " ".join(f"{ratio:.2f}" for ratio in pair_ratios))
            print("\nCPU per task at concurrency 8 (ms):")
            for path, n in (("direct", len(d)), ("bridge", len(b))):
                parts = [f"{name} {seconds / n * 1000:.0f}" for name, seconds in cpu[path].items()]
                print(f"  {path}: {', '.join(parts)}; total {sum(cpu[path].values()) / n * 1000:.0f}")
        finally:
            await direct.http.close()


async def scrape(url: str, stop: asyncio.Event) -> int:
    """Read ``/metrics`` every second until ``stop``, as Prometheus would; returns the scrapes."""
    scrapes = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while not stop.is_set():
            async with http.get(url) as response:
                await response.read()
                scrapes += response.status == 200
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    return scrapes


async def observability_cost(tmp: Path, nats: EmbeddedNats, model_url: str, tasks: int, observe: str) -> None:
    """The bridge path sequentially on a plain sidecar and on one with tracing and metrics on, both
    driving one shared OpenCode (two OpenCode processes would differ more than the sidecars do)."""
    collector = CollectorStub()
    collector_url = await collector.start()
    opencode = OpenCodeProcess(OpenCodeSettings(
        binary=find_binary("opencode"), state_dir=tmp / "opencode",
        config=opencode_provider_config(model_url), extra_path=[str(Path(sys.executable).parent)],
    ))
    await opencode.start()
    try:
        async with Stack(tmp / "plain", nats, model_url, 300, opencode=opencode) as plain, \
                Stack(tmp / "observed", nats, model_url, 300, collector=collector_url, opencode=opencode,
                      observe=observe) as observed:
            stop = asyncio.Event()
            scraper = asyncio.create_task(scrape(observed.metrics_url, stop)) if observed.metrics_url else None
            latencies: dict[str, list[float]] = {"off": [], "on": []}
            cpu = {"off": 0.0, "on": 0.0}
            chunk = max(tasks // 8, 1)
            for _ in range(3):  # warm both
                await via_bridge(plain.client, "create warm.txt with content w", "bench")
                await via_bridge(observed.client, "create warm.txt with content w", "bench")
            for label, stack in (("off", plain), ("on", observed), ("on", observed), ("off", plain)) * 4:
                before = cpu_seconds(stack.sidecar.pid)
                lat, _ = await measure(label, lambda p, st=stack: via_bridge(st.client, p, "bench"), chunk, 1)
                cpu[label] += cpu_seconds(stack.sidecar.pid) - before
                latencies[label] += lat
            stop.set()
            scrapes = await scraper if scraper is not None else 0
        off50, on50 = statistics.median(latencies["off"]), statistics.median(latencies["on"])
        off95, on95 = pct(latencies["off"], 0.95), pct(latencies["on"], 0.95)
        print(f"\nobservability: {observe} (bridge path, sequential, {len(latencies['on'])} tasks each, alternating "
              "chunks, one shared OpenCode):")
        print(f"{'':14} {'off p50':>9} {'on p50':>9} {'ratio':>6}   {'off p95':>9} {'on p95':>9} {'ratio':>6}")
        print(f"{observe:14} {off50 * 1000:7.0f}ms {on50 * 1000:7.0f}ms {on50 / off50:6.2f}   "
              f"{off95 * 1000:7.0f}ms {on95 * 1000:7.0f}ms {on95 / off95:6.2f}   (goal: p50 ratio <= 1.05)")
        n = len(latencies["on"])
        print(f"  sidecar CPU per task: off {cpu['off'] / n * 1000:.1f} ms, on {cpu['on'] / n * 1000:.1f} ms")
        print(f"  collector received {collector.requests.get('/v1/traces', 0)} trace and "
              f"{collector.requests.get('/v1/metrics', 0)} metric exports ({collector.received / 1024:.0f} KiB); "
              f"/metrics scraped {scrapes} times")
    finally:
        await opencode.stop()
        await collector.stop()


async def memory(tmp: Path, nats: EmbeddedNats, model_url: str, workspaces: int, dispose_after: float | None):
    """RSS of the sidecar and of OpenCode every 10 new workspaces, then after the idle dispose."""
    samples = []
    async with Stack(tmp, nats, model_url, dispose_after or 10**9) as stack:
        samples.append((0, rss_mib(stack.sidecar.pid), rss_mib(stack.opencode.pid)))
        for i in range(workspaces):
            await via_bridge(stack.client, "create a.txt with content x", f"ws-{i:03}")
            if (i + 1) % 10 == 0:
                samples.append((i + 1, rss_mib(stack.sidecar.pid), rss_mib(stack.opencode.pid)))
        if dispose_after:
            await asyncio.sleep(dispose_after + 5)
            samples.append(("idle", rss_mib(stack.sidecar.pid), rss_mib(stack.opencode.pid)))
        disposed = stack.log.read_text(errors="replace").count("disposed after")
    return samples, disposed


async def main(tasks: int, throughput_tasks: int, observed_tasks: int, observe: str, workspaces: int,
               dispose_after: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ocbridge-bench-"))
    nats = EmbeddedNats(tmp / "nats")
    model = OfflineModelServer()
    await nats.start()
    model_url = await model.start()
    try:
        if tasks and throughput_tasks:
            await latency(tmp / "latency", nats, model_url, tasks, throughput_tasks)
        if observed_tasks:
            await observability_cost(tmp / "observability", nats, model_url, observed_tasks, observe)
        if not workspaces:
            return
        kept, _ = await memory(tmp / "kept", nats, model_url, workspaces, None)
        freed, disposed = await memory(tmp / "freed", nats, model_url, workspaces, dispose_after)
        print(f"\nmemory (RSS, MiB) while tasks run in {workspaces} distinct workspaces, one after another:")
        freed_label = f"opencode, dispose {dispose_after:.0f}s"
        print(f"{'workspaces':>10} {'sidecar':>8} {'opencode, no dispose':>21} {freed_label:>22} {'ratio':>6}")
        for (n, sidecar_rss, kept_rss), (_, _, freed_rss) in zip(kept, freed, strict=False):
            print(f"{n!s:>10} {sidecar_rss:8.0f} {kept_rss:21.0f} {freed_rss:22.0f} {freed_rss / kept_rss:6.2f}")
        print(f"{'idle':>10} {freed[-1][1]:8.0f} {'':>21} {freed[-1][2]:22.0f}")
        print(f"directory instances disposed by the sidecar: {disposed}")
    finally:
        await model.stop()
        await nats.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20, help="per path, sequentially and at concurrency 4")
    parser.add_argument("--throughput-tasks", type=int, default=160, help="per path at concurrency 8")
    parser.add_argument("--observed-tasks", type=int, default=40,
                        help="per sidecar (observability off / on), sequentially; 0 skips the row")
    parser.add_argument("--observe", default="traces,metrics",
                        help="what the observed sidecar turns on: traces, metrics or both (default)")
    parser.add_argument("--workspaces", type=int, default=50, help="0 skips the memory rows")
    parser.add_argument("--dispose-after", type=float, default=3.0, help="idle_dispose_seconds for the sidecar")
    args = parser.parse_args()
    asyncio.run(main(args.tasks, args.throughput_tasks, args.observed_tasks, args.observe, args.workspaces,
                     args.dispose_after))
