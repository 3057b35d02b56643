"""The four coding backends side by side, as Station's ``code`` tool sees them.

Each backend gets the same one-tool tasks ("create f<i>.txt with content x") through
``CodingTools.code``, against the offline scripted model (each backend starts its own instance of
it, in this process, as it does in tests):

  * ``opencode-nats``: tools -> NATS (embedded nats-server) -> sidecar (in this process) -> ``opencode serve``;
  * ``opencode``: the pipeline in-process, HTTP to ``opencode serve`` (the baseline of the ratios);
  * ``opencode-cli``: the pipeline in-process, one ``opencode run`` process per task;
  * ``claudecode``: the pipeline in-process, one ``claude -p`` process per task.

Per backend: one warm-up task, then ``--sequential`` tasks one after the other in one session, then
``--rounds`` rounds of ``--concurrent`` tasks at once (one session each: a session runs one prompt at
a time). Prints median and p95 latency and the ratio of each to the ``opencode`` backend.

With ``--agent-tools``: the agent's Station tools instead, one row per engine (``opencode``,
``opencode-cli``, ``claudecode``) behind a sidecar: ``--sequential`` one-tool tasks that call
``station_kv_get`` against the plain one-tool task ("create ...") on the same sidecar, and the plain
task on a sidecar without the tools (what wiring them into every run costs). Goal: the MCP hop adds
under 50 ms at p50.

Run: .venv/bin/python bench/backends.py [--sequential 20] [--concurrent 4] [--rounds 5] [--backends ...]
     .venv/bin/python bench/backends.py --agent-tools [--sequential 20] [--engines ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from ocbridge.bridge.config import load_config
from ocbridge.bridge.jetstream.natsd import EmbeddedNats
from ocbridge.bridge.sidecar import Sidecar
from ocbridge.client.client import CodingClient
from ocbridge.client.protocol import Naming
from ocbridge.client.station.config import load_station_config
from ocbridge.client.station.tools import CodingTools, tools_from_config

ROOT = Path(__file__).resolve().parents[1]

BACKENDS = ("opencode-nats", "opencode", "opencode-cli", "claudecode")
BASELINE = "opencode"
ENGINES = ("opencode", "opencode-cli", "claudecode")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextlib.asynccontextmanager
async def backend_tools(backend: str, tmp: Path, concurrency: int) -> AsyncIterator[CodingTools]:
    """Started tools on ``backend`` (with NATS and a sidecar for ``opencode-nats``)."""
    block: dict = {
        "backend": backend,
        "task_timeout_min": 2,
        "workspace_base_path": str(tmp / "workspaces"),
        "bridge": {"data_dir": str(tmp / "data"), "offline_model": True},
    }
    nats = sidecar = None
    try:
        if backend == "opencode-nats":
            nats = EmbeddedNats(tmp / "nats", port=0)
            url = await nats.start()
            block["nats"] = {"url": url}
            sidecar = Sidecar(load_config(overrides={
                "nats": {"url": url}, "naming": Naming().model_dump(), "workspace_root": str(tmp / "workspaces"),
                "data_dir": str(tmp / "sidecar"), "offline_model": True, "concurrency": concurrency,
                "log_level": "WARNING",
            }, environ={}))
            await sidecar.start()
        tools = tools_from_config(load_station_config({"coding": block}, {}), {})
        await tools.start()
        try:
            yield tools
        finally:
            await tools.aclose()
    finally:
        if sidecar is not None:
            await sidecar.stop(grace=5)
        if nats is not None:
            await nats.stop()


async def timed_code(tools: CodingTools, session: str, i: int) -> float:
    started = time.perf_counter()
    out = await tools.code({"session_id": session, "instruction": f"create f{i}.txt with content x"})
    elapsed = time.perf_counter() - started
    if not out["success"] or not out.get("files_changed"):
        raise RuntimeError(f"task {i} failed: {out.get('error') or out}")
    return elapsed


async def bench_backend(backend: str, sequential: int, concurrent: int, rounds: int,
                        tmp: Path) -> tuple[list[float], list[float], float]:
    """(sequential latencies, concurrent latencies, start-up seconds) of one backend."""
    started = time.perf_counter()
    async with backend_tools(backend, tmp, concurrent) as tools:
        startup = time.perf_counter() - started
        main = (await tools.coding_open({"title": f"bench {backend}"}))["session_id"]
        await timed_code(tools, main, 0)  # warm-up: first session use, engine caches
        seq = [await timed_code(tools, main, i) for i in range(1, sequential + 1)]
        sessions = [(await tools.coding_open({"title": f"bench {backend} {k}"}))["session_id"]
                    for k in range(concurrent)]
        await asyncio.gather(*(timed_code(tools, s, 1000 + k) for k, s in enumerate(sessions)))  # warm-up
        conc: list[float] = []
        for r in range(rounds):
            conc += await asyncio.gather(*(timed_code(tools, s, 2000 + r * concurrent + k)
                                           for k, s in enumerate(sessions)))
        for s in [main, *sessions]:
            await tools.coding_close({"session_id": s})
    return seq, conc, startup


def report(results: dict[str, tuple[list[float], list[float], float]], concurrent: int) -> None:
    base = results.get(BASELINE)
    print(f"\n{'backend':14} {'start':>6} | {'seq p50':>8} {'p95':>7} {'x':>5} | "
          f"{f'conc{concurrent} p50':>10} {'p95':>7} {'x':>5}")
    for name, (seq, conc, startup) in results.items():
        cells = []
        for values, index in ((seq, 0), (conc, 1)):
            p50, p95 = statistics.median(values), pct(values, 0.95)
            ratio = p50 / statistics.median(base[index]) if base else float("nan")
            cells.append(f"{p50 * 1000:6.0f}ms {p95 * 1000:5.0f}ms {ratio:5.2f}")
        print(f"{name:14} {startup:5.1f}s | {cells[0]} | {cells[1]:>25}")
    print(f"\nx = median latency / median of the {BASELINE} (direct HTTP) backend; p95 over "
          f"{len(next(iter(results.values()))[0])} sequential and {len(next(iter(results.values()))[1])} "
          "concurrent tasks")


# ------------------------------------------------------------------------------ agent tools


async def timed_run(client: CodingClient, prompt: str, check: str, workspace: str) -> tuple[float, float | None]:
    """(latency, duration of its one tool call as the engine reports it) of one task."""
    started = time.perf_counter()
    handle = await client.submit(prompt, workspace=workspace, session=workspace, timeout=120)
    tools = [e.tool.duration for e in [e async for e in handle.events(timeout=150)] if e.type == "tool_end"]
    result = await handle.result(timeout=30)
    elapsed = time.perf_counter() - started
    if result.status != "completed" or check not in result.result:
        raise RuntimeError(f"{workspace}: {result.status} {result.error or result.result!r}")
    return elapsed, (tools[0] / 1000 if tools and tools[0] is not None else None)


class Samples(dict):
    """task kind -> (latencies, tool durations)."""

    def add(self, kind: str, sample: tuple[float, float | None]) -> None:
        latencies, tools = self.setdefault(kind, ([], []))
        latencies.append(sample[0])
        if sample[1] is not None:
            tools.append(sample[1])


async def bench_agent_tools(engine: str, n: int, tmp: Path) -> Samples:
    """One engine: the plain one-tool task on a sidecar without the tools, then the plain task and
    the ``station_kv_get`` task, alternating, on a sidecar with them (drift hits both alike)."""
    nats = EmbeddedNats(tmp / "nats", port=0)
    url = await nats.start()
    out = Samples()
    plain, kv_get = ("create f{i}.txt with content x", "Wrote"), ("kv get bench.value", "forty-two")
    try:
        for enabled in (False, True):
            tag = int(enabled)
            naming = Naming(stream_name=f"T{tag}", consumer_name=f"w{tag}", task_subject=f"t{tag}.task",
                            stream_prefix=f"t{tag}.stream", result_prefix=f"t{tag}.result",
                            dead_letter_stream=f"D{tag}")
            sidecar = Sidecar(load_config(overrides={
                "nats": {"url": url}, "naming": naming.model_dump(), "engine": engine,
                "workspace_root": str(tmp / "workspaces"), "data_dir": str(tmp / f"sidecar{tag}"),
                "offline_model": True, "log_level": "WARNING", "agent_tools": {"enabled": enabled},
            }, environ={}))
            await sidecar.start()
            ensure = getattr(sidecar.engine, "_ensure_tools", None)
            if enabled and ensure is not None:  # OpenCode serve: time the per-run registration (POST /mcp)
                async def timed_ensure(*args, _ensure=ensure):
                    started = time.perf_counter()
                    await _ensure(*args)
                    out.add("registration", (time.perf_counter() - started, None))

                sidecar.engine._ensure_tools = timed_ensure
            try:
                async with await CodingClient.connect(url, naming=naming) as client:
                    state = await client.nc.jetstream().key_value(naming.state_bucket)
                    await state.put("bench.value", b"forty-two")
                    kinds = [("plain, tools on", plain), ("station_kv_get", kv_get)] if enabled else \
                        [("plain, tools off", plain)]
                    for i in range(n + 1):  # the first round warms up
                        for kind, (prompt, check) in kinds:
                            sample = await timed_run(client, prompt.format(i=i), check, f"{kind[:5]}-{tag}")
                            if i:
                                out.add(kind, sample)
            finally:
                await sidecar.stop(grace=5)
    finally:
        await nats.stop()
    return out


def report_agent_tools(results: dict[str, Samples]) -> None:
    print(f"\n{'engine':13} {'task':17} {'p50':>7} {'p95':>7} | {'tool p50':>8} {'p95':>6} | "
          f"{'kv_get - plain p50':>18} {'tool':>6}")
    for engine, rows in results.items():
        plain_latencies, plain_tools = rows["plain, tools on"]
        if "registration" in rows:  # printed last
            rows["registration"] = rows.pop("registration")
        for task, (latencies, tools) in rows.items():
            p50, p95 = statistics.median(latencies), pct(latencies, 0.95)
            tool = f"{statistics.median(tools) * 1000:6.0f}ms {pct(tools, 0.95) * 1000:4.0f}ms" if tools else \
                f"{'-':>8} {'-':>6}"
            extra = ""
            if task == "station_kv_get":
                extra = f"{(p50 - statistics.median(plain_latencies)) * 1000:+16.0f}ms"
                if tools and plain_tools:
                    extra += f" {(statistics.median(tools) - statistics.median(plain_tools)) * 1000:+4.0f}ms"
            print(f"{engine:13} {task:17} {p50 * 1000:5.0f}ms {p95 * 1000:5.0f}ms | {tool} | {extra}")
    print("\nplain = one write tool (create f<i>.txt); station_kv_get = one MCP tool call to the sidecar. "
          "'tool' = the call's duration as the engine reports it (write tool vs. MCP round trip). "
          "Tools off/on: the plain task on a sidecar without and with the tools wired into every run.")


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ocbridge-backends-"))
    if args.agent_tools:
        tool_results: dict[str, Samples] = {}
        try:
            for engine in args.engines:
                print(f"{engine}: {args.sequential} tasks of each kind...", flush=True)
                tool_results[engine] = await bench_agent_tools(engine, args.sequential, tmp / f"tools-{engine}")
        finally:
            if tool_results:
                report_agent_tools(tool_results)
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
        return
    results: dict[str, tuple[list[float], list[float], float]] = {}
    try:
        for backend in args.backends:
            print(f"{backend}: {args.sequential} sequential, {args.rounds} x {args.concurrent} concurrent...",
                  flush=True)
            results[backend] = await bench_backend(backend, args.sequential, args.concurrent, args.rounds,
                                                   tmp / backend)
    finally:
        if results:
            report(results, args.concurrent)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --concurrent tasks at once")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--keep", help="keep workspaces and state in this folder")
    parser.add_argument("--agent-tools", action="store_true", help="benchmark the agent's Station tools (MCP)")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    asyncio.run(main(parser.parse_args()))
