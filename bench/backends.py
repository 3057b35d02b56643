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

Run: .venv/bin/python bench/backends.py [--sequential 20] [--concurrent 4] [--rounds 5] [--backends ...]
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
from ocbridge.client.protocol import Naming
from ocbridge.client.station.config import load_station_config
from ocbridge.client.station.tools import CodingTools, tools_from_config

ROOT = Path(__file__).resolve().parents[1]

BACKENDS = ("opencode-nats", "opencode", "opencode-cli", "claudecode")
BASELINE = "opencode"


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


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ocbridge-backends-"))
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
    asyncio.run(main(parser.parse_args()))
