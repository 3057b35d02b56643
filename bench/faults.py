"""Exactly one result under faults: the same tasks with and without NATS, OpenCode and a sidecar dying.

Two ``ocbridge serve`` processes (real OpenCode each, one shared offline model run by this harness,
``jetstream.ack_wait`` 3 s) take one-tool tasks (``create f<i>.txt with content <i>``, workspaces
``ws0`` .. ``ws7``, one new session per task) that ``CodingClient`` submits with a fixed number in
flight. The same load runs twice, each on a fresh stack (own nats-server, model, sidecars, workspaces):

  (a) clean;
  (b) while the harness injects, as tasks complete: at 15% a NATS restart (the same nats-server
      stopped and started on its port and store), at 40% a SIGKILL of sidecar s0's ``opencode serve``
      (its supervisor restarts it), at 65% a SIGKILL of sidecar s1 (s0, on the same host, gives
      its deliveries back at once, see ``bridge/jetstream/rescue.py``; elsewhere they would come
      back after ack_wait); a replacement sidecar s2 is started at once unless ``--no-replace``.
      ``--faults nats,opencode`` (say) injects only some of them, to tell their costs apart.

The client is a closed loop, like agents waiting for their coding results: ``--inflight`` tasks
(default: the sidecars' total capacity) are out at any time, and a task that is slow to come back
holds its slot, so a 30 s wait on one task costs the run about 30 s / inflight of wall time.

Per run: completed (a ``completed`` result), failed (another status), lost (no result within
``--deadline`` seconds of its submission), duplicated, retried, throughput (completed tasks per
second of wall time, first submit to last result), the time until 95% of the results were in,
p50/p95 latency (submit to result), results per 2 s (where the run stalled) and the 5 slowest
tasks (the ones over 10 s are explained in the details, with their sidecar log lines).

Duplicated counts a task when any of these holds:
  * more than one result message on its result subject (a subscription of the harness on
    ``<result prefix>.>``, counted until ``--settle`` seconds after the last task ended);
  * its file was written more than once: the model saw the results of two different write calls
    (the model server counts, per task, the requests that start its prompt and the distinct tool
    call ids whose results come back, so the count survives OpenCode and sidecar deaths; a run
    OpenCode resumes after a restart sends the same call's result again, which is one write). Split into
    re-runs after a run that died or was given back (record ``attempt`` > 1: the write of the
    first run was done, its result was not) and writes repeated within one run;
    a write call whose result came back "[Tool execution was interrupted]" (the OpenCode kill cut it
    off, and the restarted server carried the run on) is no write: the model then writes again in
    the same run, and such tasks are listed on a row of their own;
  * its file changed after its first result arrived (mtime), or has the wrong content.
Retried comes from the task records (tasks bucket): ``attempt`` > 1 (ran more than once),
``retries`` (give-backs that were not the task's fault), died runs = attempt - 1 - retries.
A result the harness's subscription missed while NATS restarted, but the client got (from the task
record, see ``presence_interval``), is listed as "result not seen on its subject".

Lost or duplicated tasks are listed with their record and the sidecar log lines naming them, and
the run directory is kept. Every process started is stopped at the end (also on Ctrl-C or failure;
sidecars and nats-server also die with this process), and a last scan reports any left over.

Per-task figures go to ``<run dir>/<clean|faults>/outcomes.json``.

Run: .venv/bin/python bench/faults.py [--tasks 200] [--sidecars 2] [--concurrency 4] [--inflight 8]
     [--faults nats,opencode,sidecar] [--no-replace] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from aiohttp import web

from ocbridge.bridge.jetstream.natsd import EmbeddedNats
from ocbridge.bridge.offline_model import openai_api
from ocbridge.bridge.offline_model.configs import opencode_provider_config
from ocbridge.bridge.offline_model.script import INTERRUPTED
from ocbridge.bridge.offline_model.server import OfflineModelServer
from ocbridge.bridge.processes import die_with_parent_hook
from ocbridge.client.client import CodingClient, TaskNotFound
from ocbridge.client.protocol import Naming, TaskRecord

OCBRIDGE = str(Path(sys.executable).parent / "ocbridge")
_TASK_PROMPT = re.compile(r"create f(\d+)\.txt with content")
_OPENCODE_UP = re.compile(r"OpenCode \S+ listening on")

log = logging.getLogger("bench.faults")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


# ------------------------------------------------------------------------------------ the model


class CountingModel(OfflineModelServer):
    """The offline model, counting per task (the ``<i>`` of ``f<i>.txt``) the requests that start
    its prompt (``starts``) and the tool calls whose results come back (``writes``: their ids,
    random per answer), apart from those that came back as interrupted (``interrupted``: OpenCode
    died while the tool ran, and its successor reports it so). Request bodies are not kept (the
    base class keeps them all)."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: Counter[int] = Counter()
        self.writes: dict[int, set[str]] = {}
        self.interrupted: dict[int, set[str]] = {}

    @web.middleware
    async def _record(self, request: web.Request, handler):
        if request.method == "POST" and request.path.endswith("/chat/completions"):
            with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError, TypeError):
                self._count(json.loads(await request.read()))  # read() caches: the handler reads again
        return await handler(request)

    def _count(self, body: dict[str, Any]) -> None:
        conv = openai_api.to_conversation(body)
        if not conv.tools:  # the title request
            return
        match = _TASK_PROMPT.search(conv.prompt())
        if match is None:
            return
        task = int(match.group(1))
        if not conv.results_since_prompt():
            self.starts[task] += 1
            return
        for message in body.get("messages") or []:
            if message.get("role") != "tool":
                continue
            cut_off = INTERRUPTED in json.dumps(message.get("content"))  # (the text alone, or in parts)
            (self.interrupted if cut_off else self.writes).setdefault(task, set()).add(str(message.get("tool_call_id")))


# ---------------------------------------------------------------------------------- processes


class SidecarProc:
    """``ocbridge serve`` as a child process (dies with this one), with its log file."""

    def __init__(self, name: str, config_file: Path, log_file: Path) -> None:
        self.name, self.config_file, self.log_file = name, config_file, log_file
        self.proc: asyncio.subprocess.Process | None = None
        self.killed = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self, ready_timeout: float = 90.0) -> float:
        """Start and wait for "ready"; returns the seconds it took."""
        started = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if not k.startswith("OCBRIDGE_")}
        with self.log_file.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                OCBRIDGE, "serve", "--config", str(self.config_file), stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=out, env=env, start_new_session=True, preexec_fn=die_with_parent_hook(),
            )
        deadline = time.perf_counter() + ready_timeout
        while "ready; workspaces under" not in self.log_text():
            if self.proc.returncode is not None or time.perf_counter() > deadline:
                tail = self.log_text()[-3000:]
                await self.stop()
                raise RuntimeError(f"sidecar {self.name} did not start:\n{tail}")
            await asyncio.sleep(0.1)
        return time.perf_counter() - started

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def opencode_pid(self) -> int | None:
        """The ``opencode serve`` this sidecar runs (``None`` while it is being restarted)."""
        if self.proc is None or self.proc.returncode is not None:
            return None
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return None
        for child in children:
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            if cmd and Path(cmd[0]).name == "opencode" and "serve" in cmd:
                return child.pid
        return None

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.killed = True
            self.proc.kill()
            await self.proc.wait()

    async def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            log.warning("sidecar %s ignored SIGTERM for %.0fs; killing it", self.name, timeout)
            self.proc.kill()
            await self.proc.wait()


def processes_under(path: Path) -> list[psutil.Process]:
    """Processes (other than this one) whose command line or working directory is under ``path``."""
    found, me, text = [], os.getpid(), str(path)
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        if proc.info["pid"] == me:
            continue
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if text in cmdline or (proc.info.get("cwd") or "").startswith(text):
            found.append(proc)
    return found


# -------------------------------------------------------------------------------------- a stack


class Stack:
    """A nats-server, the counting model and ``n`` sidecars sharing one workspace root."""

    def __init__(self, tmp: Path, args: argparse.Namespace) -> None:
        self.tmp, self.args = tmp, args
        self.root = tmp / "workspaces"
        tag = uuid.uuid4().hex[:6]
        self.naming = Naming(
            task_subject=f"bf{tag}.coding.task", stream_prefix=f"bf{tag}.coding.stream",
            result_prefix=f"bf{tag}.coding.result", sessions_bucket=f"sessions-{tag}",
            state_bucket=f"state-{tag}", object_store=f"files-{tag}", tasks_bucket=f"tasks-{tag}",
            leases_bucket=f"leases-{tag}", stream_name=f"TASKS_{tag}", dead_letter_stream=f"DEAD_{tag}",
            consumer_name=f"workers-{tag}",
        )
        self.nats = EmbeddedNats(tmp / "nats")
        self.model = CountingModel()
        self.sidecars: list[SidecarProc] = []
        self.client: CodingClient | None = None

    def new_sidecar(self) -> SidecarProc:
        name = f"s{len(self.sidecars)}"
        config = self.tmp / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "nats": {"url": self.nats.url},
            "naming": self.naming.model_dump(),
            "workspace_root": str(self.root),
            "data_dir": str(self.tmp / f"data-{name}"),
            "concurrency": self.args.concurrency,
            # Leases of a killed sidecar block its task and session for lease_ttl seconds.
            "jetstream": {"ack_wait": self.args.ack_wait, "lease_ttl": self.args.lease_ttl},
            "opencode": {"config": opencode_provider_config(self.model_url)},
            "shutdown_grace": 5,
            "log_level": "INFO",
        }))
        sidecar = SidecarProc(name, config, self.tmp / f"{name}.log")
        self.sidecars.append(sidecar)
        return sidecar

    async def __aenter__(self) -> Stack:
        self.tmp.mkdir(parents=True)
        try:
            await self.nats.start()
            self.model_url = await self.model.start()
            sidecars = [self.new_sidecar() for _ in range(self.args.sidecars)]
            await asyncio.gather(*(s.start() for s in sidecars))
            self.client = await CodingClient.connect(self.nats.url, naming=self.naming, retry_for=30)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.close(), 10)
            self.client = None
        await asyncio.gather(*(s.stop() for s in self.sidecars), return_exceptions=True)
        await self.nats.stop()
        await self.model.stop()

    def sidecar_of(self, record: TaskRecord | None) -> str:
        """The name (s0, s1...) of the sidecar a record names (its id holds the pid)."""
        if record is None or not record.sidecar:
            return "-"
        pid = record.sidecar.split("-")[-2]
        return next((s.name for s in self.sidecars if str(s.pid) == pid), record.sidecar)


# -------------------------------------------------------------------------------------- a run


@dataclass
class Outcome:
    index: int
    task_id: str
    latency: float | None = None
    status: str | None = None
    error: str | None = None
    problem: str | None = None  # lost: why
    result_at: float | None = None  # time.time() when the client got the result
    ended: float | None = None  # time.perf_counter() then
    submit_retries: int = 0


@dataclass
class RunReport:
    label: str
    outcomes: list[Outcome]
    wall: float
    t0: float = 0.0
    faults: list[str] = field(default_factory=list)
    result_messages: Counter[str] = field(default_factory=Counter)
    records: dict[str, TaskRecord | None] = field(default_factory=dict)
    starts: Counter[int] = field(default_factory=Counter)
    writes: Counter[int] = field(default_factory=Counter)
    interrupted: Counter[int] = field(default_factory=Counter)  # write calls that came back interrupted
    file_problems: dict[int, str] = field(default_factory=dict)
    by_sidecar: Counter[str] = field(default_factory=Counter)
    logged_give_backs: int = 0
    rescued: int = 0  # deliveries of a dead sidecar given back at once by one on the same host
    details: list[str] = field(default_factory=list)

    @property
    def completed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "completed"]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status is not None and o.status != "completed"]

    @property
    def lost(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status is None]

    def multi_results(self) -> list[Outcome]:
        return [o for o in self.outcomes if self.result_messages[o.task_id] > 1]

    def written_twice(self) -> list[Outcome]:
        return [o for o in self.outcomes if self.writes[o.index] > 1]

    def written_twice_rerun(self) -> list[Outcome]:
        """Written twice, and the task ran twice: its first run died with its sidecar or was given back."""
        return [o for o in self.written_twice() if (getattr(self.records.get(o.task_id), "attempt", 1) or 1) > 1]

    def redone_after_interruption(self) -> list[Outcome]:
        """Tasks whose write call came back "[Tool execution was interrupted]" (the OpenCode kill cut
        it off; the run carried on on the restarted server) and the model wrote again, in the same run."""
        return [o for o in self.outcomes if self.interrupted[o.index] and self.writes[o.index]]

    def file_changed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.index in self.file_problems]

    def written_twice_in_one_run(self) -> list[Outcome]:
        reruns = {o.task_id for o in self.written_twice_rerun()}
        return [o for o in self.written_twice() if o.task_id not in reruns]

    def duplicated(self) -> list[Outcome]:
        """Tasks that ran twice or answered twice: more than one result message, a file written
        twice (by two runs, or twice in one), or changed after the result."""
        ids = {o.task_id for o in (*self.multi_results(), *self.written_twice(), *self.file_changed())}
        return [o for o in self.outcomes if o.task_id in ids]

    def unseen(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status is not None and not self.result_messages[o.task_id]]

    def retried(self) -> list[TaskRecord]:
        return [r for r in self.records.values() if r is not None and (r.attempt or 0) > 1]

    def give_backs(self) -> int:
        return sum(r.retries or 0 for r in self.records.values() if r is not None)

    def died_runs(self) -> int:
        return sum(max(0, (r.attempt or 1) - 1 - (r.retries or 0)) for r in self.records.values() if r is not None)

    def throughput(self) -> float:
        return len(self.completed) / self.wall if self.wall else 0.0

    def time_to(self, fraction: float) -> float:
        ends = sorted(o.ended - self.t0 for o in self.outcomes if o.ended is not None)
        return ends[min(len(ends) - 1, max(0, int(len(self.outcomes) * fraction) - 1))] if ends else float("nan")

    def latencies(self) -> list[float]:
        return [o.latency for o in self.completed if o.latency is not None]


class Progress:
    """Counts tasks that ended (result, or given up); lets the fault injector wait for a count."""

    def __init__(self) -> None:
        self.done = 0
        self._changed = asyncio.Event()

    def bump(self) -> None:
        self.done += 1
        self._changed.set()

    async def reach(self, count: int, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.done < count:
                    self._changed.clear()
                    await self._changed.wait()
        return self.done >= count


async def submit(client: CodingClient, task, deadline: float, outcome: Outcome):
    """Publish ``task``, again on failure (NATS restarting) until ``deadline``: the same taskID
    (``Nats-Msg-Id``) makes a retry of a publish that did land a no-op."""
    loop, delay = asyncio.get_running_loop(), 0.2
    while True:
        try:
            return await client.submit(task, events=False)
        except Exception as exc:
            if loop.time() + delay > deadline:
                raise
            outcome.submit_retries += 1
            log.info("task %s: submit failed (%r); again in %.1fs", task.task_id, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def drive(stack: Stack, args: argparse.Namespace, label: str, count: int, prompt, progress: Progress | None,
                run_deadline: float) -> list[Outcome]:
    """Submit ``count`` tasks with ``args.inflight`` in flight; each waits for its result."""
    client = stack.client
    assert client is not None
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(args.inflight)
    outcomes = [Outcome(i, f"{label}-{i:04d}-{uuid.uuid4().hex[:6]}") for i in range(count)]

    async def one(o: Outcome) -> None:
        async with gate:
            try:
                if loop.time() > run_deadline:
                    o.problem = "not submitted: the run's deadline had passed"
                    return
                text, workspace = prompt(o.index)
                task = client.build_task(text, workspace=workspace, session=f"{label}-s{o.index}",
                                         task_id=o.task_id, timeout=args.task_timeout)
                started = time.perf_counter()
                deadline = min(loop.time() + args.deadline, run_deadline)
                try:
                    handle = await submit(client, task, deadline, o)
                except Exception as exc:
                    o.problem = f"could not be submitted: {exc!r}"
                    return
                try:
                    result = await handle.result(timeout=max(0.1, deadline - loop.time()))
                except TimeoutError:
                    o.problem = f"no result {time.perf_counter() - started:.0f}s after its submission"
                    return
                except TaskNotFound as exc:
                    o.problem = f"client: {exc}"
                    return
                except Exception as exc:  # anything else the client raises: the task counts as lost
                    o.problem = f"client error: {exc!r}"
                    return
                finally:
                    await handle.close()
                o.ended, o.result_at = time.perf_counter(), time.time()
                o.latency = o.ended - started
                o.status, o.error = result.status.value, result.error
            finally:
                if progress is not None:
                    progress.bump()

    await asyncio.gather(*(one(o) for o in outcomes))
    return outcomes


async def inject_faults(stack: Stack, args: argparse.Namespace, progress: Progress, notes: list[str],
                        t0: float) -> None:
    """At 15%, 40% and 65% of the tasks ended: restart NATS, kill s0's OpenCode, kill s1."""

    def note(text: str) -> None:
        line = f"t={time.perf_counter() - t0:5.1f}s {text}"
        notes.append(line)
        log.info("fault: %s", line)

    async def at(fraction: float) -> None:
        target = int(args.tasks * fraction)
        if not await progress.reach(target, args.deadline):
            note(f"(only {progress.done}/{target} tasks ended within {args.deadline:.0f}s; injecting anyway)")

    await at(0.15)
    if "nats" in args.faults:
        started = time.perf_counter()
        await stack.nats.stop()
        stopped = time.perf_counter()
        await stack.nats.start()
        note(f"NATS restarted: stopped in {stopped - started:.1f}s, accepting clients again "
             f"{time.perf_counter() - started:.1f}s after the stop began")

    await at(0.40)
    victim = stack.sidecars[0]
    ups = len(_OPENCODE_UP.findall(victim.log_text()))
    pid = victim.opencode_pid()
    if "opencode" not in args.faults:
        pass
    elif pid is None:
        note(f"OpenCode of {victim.name} not found: not killed")
    else:
        os.kill(pid, signal.SIGKILL)
        killed = time.perf_counter()
        note(f"OpenCode of {victim.name} SIGKILLed (pid {pid})")
        for _ in range(600):
            if back := len(_OPENCODE_UP.findall(victim.log_text())) > ups:
                break
            await asyncio.sleep(0.1)
        note(f"OpenCode of {victim.name} " + (f"answering again after {time.perf_counter() - killed:.1f}s"
                                             if back else "not back within 60s"))

    await at(0.65)
    if "sidecar" not in args.faults:
        return
    victim = stack.sidecars[1 % len(stack.sidecars)]
    pid, oc_pid = victim.pid, victim.opencode_pid()
    await victim.kill()
    note(f"sidecar {victim.name} SIGKILLed (pid {pid})")
    if oc_pid is not None:
        for _ in range(50):
            try:
                if psutil.Process(oc_pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            await asyncio.sleep(0.1)
        else:
            note(f"its OpenCode (pid {oc_pid}) still runs 5s later")
    if args.replace:
        replacement = stack.new_sidecar()
        took = await replacement.start()
        note(f"replacement sidecar {replacement.name} ready after {took:.1f}s")


async def run_once(label: str, base: Path, args: argparse.Namespace, faults: bool) -> RunReport:
    async with Stack(base / label, args) as stack:
        client = stack.client
        assert client is not None
        loop = asyncio.get_running_loop()
        workspaces = args.workspaces

        # Warm-up (not measured): OpenCode's directory instances, sessions, NATS subjects.
        warm = await drive(stack, args, f"{label}w", 3 * args.inflight,
                           lambda i: (f"create warm{i}.txt with content w", f"ws{i % workspaces}"), None,
                           loop.time() + 300)
        if any(o.status != "completed" for o in warm):
            raise RuntimeError(f"warm-up failed: {[(o.task_id, o.status, o.error, o.problem) for o in warm]}")

        seen: Counter[str] = Counter()
        prefix = stack.naming.result_prefix + "."

        async def on_result(msg) -> None:
            seen[msg.subject[len(prefix):]] += 1

        sub = await client.nc.subscribe(prefix + ">", cb=on_result)
        progress = Progress()
        notes: list[str] = []
        t0 = time.perf_counter()
        run_deadline = loop.time() + args.run_deadline
        injector = asyncio.create_task(inject_faults(stack, args, progress, notes, t0)) if faults else None
        try:
            outcomes = await drive(stack, args, label, args.tasks,
                                   lambda i: (f"create f{i}.txt with content {i}", f"ws{i % workspaces}"),
                                   progress, run_deadline)
            ends = [o.ended for o in outcomes if o.ended is not None]
            wall = (max(ends) if ends else time.perf_counter()) - t0
            if injector is not None:
                await asyncio.wait_for(injector, 120)  # a late replacement start
        finally:
            if injector is not None and not injector.done():
                injector.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await injector
        report = RunReport(label, outcomes, wall, t0=t0, faults=notes)

        # Late duplicates (a redelivery re-publishing, a result buffered across the restart).
        await asyncio.sleep(args.settle)
        await sub.unsubscribe()
        report.result_messages = seen
        for o in outcomes:
            try:
                report.records[o.task_id] = await asyncio.wait_for(client.task_record(o.task_id), 10)
            except Exception as exc:
                report.records[o.task_id] = None
                report.details.append(f"{o.task_id}: record unreadable: {exc!r}")
            report.by_sidecar[stack.sidecar_of(report.records[o.task_id])] += 1
            path = stack.root / f"ws{o.index % workspaces}" / f"f{o.index}.txt"
            if path.exists():
                content = path.read_text(errors="replace")
                if content != str(o.index):
                    report.file_problems[o.index] = f"content {content[:40]!r}"
                elif o.result_at is not None and path.stat().st_mtime > o.result_at:
                    report.file_problems[o.index] = (f"written {path.stat().st_mtime - o.result_at:.2f}s "
                                                     "after its result arrived")
            elif o.status == "completed":
                report.file_problems[o.index] = "missing although completed"
        report.starts, report.writes = Counter(stack.model.starts), Counter(
            {task: len(calls) for task, calls in stack.model.writes.items()})
        report.interrupted = Counter({task: len(calls) for task, calls in stack.model.interrupted.items()})
        report.details += explain(report, stack)
        (stack.tmp / "outcomes.json").write_text(json.dumps([per_task(report, stack, o) for o in outcomes], indent=1))
        return report


def per_task(report: RunReport, stack: Stack, o: Outcome) -> dict[str, Any]:
    record = report.records.get(o.task_id)
    return {
        "task": o.task_id, "latency": o.latency, "ended": o.ended - report.t0 if o.ended else None,
        "status": o.status, "problem": o.problem,
        "submitRetries": o.submit_retries, "resultMessages": report.result_messages[o.task_id],
        "modelStarts": report.starts[o.index], "writes": report.writes[o.index],
        "interruptedWrites": report.interrupted[o.index],
        "file": report.file_problems.get(o.index, "ok"), "sidecar": stack.sidecar_of(record),
        "record": {"state": record.state, "attempt": record.attempt, "retries": record.retries} if record else None,
    }


def explain(report: RunReport, stack: Stack) -> list[str]:
    """Each lost, failed or duplicated task (and the 5 slowest over 10 s): what the harness saw,
    its record, the sidecar log lines naming it."""
    lines = []
    slow = sorted((o for o in report.outcomes if (o.latency or 0) > 10), key=lambda o: -(o.latency or 0))[:5]
    suspects = {o.task_id: o for o in (*report.lost, *report.failed, *report.duplicated(), *slow)}
    logs = {s.name: s.log_text().splitlines() for s in stack.sidecars}
    ours = [line for text in logs.values() for line in text if f"task {report.label}-" in line]
    report.rescued = sum(1 for line in ours if "given back for redelivery now" in line)
    report.logged_give_backs = sum(1 for line in ours if " given back " in line) - report.rescued
    for task_id, o in suspects.items():
        record = report.records.get(task_id)
        lines.append(
            f"{task_id}: latency={o.latency or 0:.1f}s status={o.status} problem={o.problem} error={o.error!r} "
            f"result messages={report.result_messages[task_id]} model starts={report.starts[o.index]} "
            f"writes={report.writes[o.index]} file={report.file_problems.get(o.index, 'ok')} "
            f"submit retries={o.submit_retries}"
        )
        data = record.to_dict() if record is not None else None
        if data and isinstance(data.get("result"), dict):  # the essentials of the result only
            data["result"] = {k: data["result"].get(k) for k in ("status", "error", "errorType", "metrics")}
        lines.append(f"  record: {json.dumps(data)}")
        for name, text in logs.items():
            lines += [f"  {name}: {line}" for line in text if task_id in line][:30]
    return lines


# ---------------------------------------------------------------------------------- reporting


def print_reports(clean: RunReport, faulted: RunReport, args: argparse.Namespace) -> None:
    runs = (clean, faulted)

    def row(label: str, values: list[str], extra: str = "") -> None:
        print(f"{label:34} {values[0]:>10} {values[1]:>10}{('   ' + extra) if extra else ''}")

    print(f"\n{args.tasks} tasks, {args.sidecars} sidecars x concurrency {args.concurrency}, {args.inflight} in "
          f"flight, ack_wait {args.ack_wait:g}s, lease_ttl {args.lease_ttl:g}s, real OpenCode + offline model; "
          f"replacement sidecar: "
          f"{'yes' if args.replace else 'no'}")
    print(f"faults injected ({', '.join(sorted(args.faults))}):")
    for line in faulted.faults:
        print(f"  {line}")
    print()
    row("", ["clean", "faults"])
    row("tasks", [str(len(r.outcomes)) for r in runs])
    row("completed", [str(len(r.completed)) for r in runs])
    row("failed (error result)", [str(len(r.failed)) for r in runs])
    row("lost (no result)", [str(len(r.lost)) for r in runs], f"deadline {args.deadline:.0f}s per task")
    row("duplicated", [str(len(r.duplicated())) for r in runs])
    row("  more than one result message", [str(len(r.multi_results())) for r in runs])
    row("  file written by two runs", [str(len(r.written_twice_rerun())) for r in runs], "(re-run after a died run)")
    row("  file written twice in one run", [str(len(r.written_twice_in_one_run())) for r in runs])
    row("  file changed after its result", [str(len(r.file_changed())) for r in runs])
    row("write cut off, redone in its run", [str(len(r.redone_after_interruption())) for r in runs],
        "(OpenCode killed during the write; not a duplicate)")
    row("retried (attempt > 1)", [str(len(r.retried())) for r in runs])
    row("  give-backs (retries)", [str(r.give_backs()) for r in runs])
    row("  runs that died (attempt-1-retries)", [str(r.died_runs()) for r in runs])
    row("give-backs in the sidecar logs", [str(r.logged_give_backs) for r in runs])
    row("dead sidecar's tasks given back", [str(r.rescued) for r in runs], "(at once, by a sidecar on its host)")
    row("prompt starts seen by the model", [str(sum(r.starts.values())) for r in runs])
    row("result not seen on its subject", [str(len(r.unseen())) for r in runs])
    row("submits retried", [str(sum(o.submit_retries for o in r.outcomes)) for r in runs])
    row("tasks per sidecar", [" ".join(f"{k}:{v}" for k, v in sorted(r.by_sidecar.items())) for r in runs])
    row("wall time", [f"{r.wall:.1f}s" for r in runs])
    row("time to 95% of the results", [f"{r.time_to(0.95):.1f}s" for r in runs])
    ratio = faulted.throughput() / clean.throughput() if clean.throughput() else float("nan")
    row("throughput", [f"{r.throughput():.2f}/s" for r in runs], f"faults/clean {ratio:.2f} (goal >= 0.8)")
    row("p50 latency", [f"{statistics.median(r.latencies()) * 1000:.0f}ms" if r.latencies() else "-"
                        for r in runs])
    p95 = [pct(r.latencies(), 0.95) for r in runs]
    row("p95 latency", [f"{v * 1000:.0f}ms" for v in p95], f"faults/clean {p95[1] / p95[0]:.2f}")
    for r in runs:
        ends = Counter(int((o.ended - r.t0) // 2) for o in r.outcomes if o.ended is not None)
        print(f"{r.label}: results per 2 s: " + " ".join(str(ends.get(i, 0)) for i in range(max(ends, default=0) + 1)))
    for r in runs:
        slow = sorted((o for o in r.outcomes if o.latency is not None), key=lambda o: -(o.latency or 0))[:5]
        print(f"{r.label}: slowest: " + ", ".join(
            f"{o.task_id.split('-')[1]} {o.latency:.1f}s (attempt {getattr(r.records.get(o.task_id), 'attempt', '?')}, "
            f"{r.result_messages[o.task_id]} result msg)" for o in slow))
    for r in runs:
        if r.details:
            print(f"\n{r.label}: details")
            for line in r.details:
                print(f"  {line}")


async def main(args: argparse.Namespace) -> int:
    base = Path(tempfile.mkdtemp(prefix="ocbridge-faults-"))
    keep = args.keep
    code = 1
    try:
        print(f"clean run: {args.tasks} tasks ...", flush=True)
        clean = await run_once("clean", base, args, faults=False)
        print(f"faulted run: {args.tasks} tasks ...", flush=True)
        faulted = await run_once("faults", base, args, faults=True)
        print_reports(clean, faulted, args)
        problems = any(r.lost or r.duplicated() or r.failed for r in (clean, faulted))
        keep = keep or problems
        code = 2 if problems else 0
    finally:
        leftovers = processes_under(base)
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                print(f"left over, killing: {proc.pid} {' '.join(proc.cmdline())[:120]}", file=sys.stderr)
                proc.kill()
        print(f"\nprocesses left over: {len(leftovers)}")
        if keep:
            print(f"run directory kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return code


def entry() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--sidecars", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4, help="per sidecar")
    parser.add_argument("--inflight", type=int, default=None,
                        help="tasks the client keeps in flight (default: sidecars x concurrency)")
    parser.add_argument("--workspaces", type=int, default=8)
    parser.add_argument("--lease-ttl", type=float, default=6.0, help="task and session lease TTL (s)")
    parser.add_argument("--ack-wait", type=float, default=3.0)
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds a task may take before it is lost")
    parser.add_argument("--run-deadline", type=float, default=900.0, help="bound on one run's measured part")
    parser.add_argument("--task-timeout", type=float, default=60.0, help="the tasks' own timeout (s)")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to wait for late duplicates")
    parser.add_argument("--faults", default="nats,opencode,sidecar",
                        help="which faults to inject, comma-separated (default: all three)")
    parser.add_argument("--no-replace", dest="replace", action="store_false",
                        help="do not start a replacement for the killed sidecar")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs, workspaces)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    args.inflight = args.inflight or args.sidecars * args.concurrency
    args.faults = {f.strip() for f in args.faults.split(",") if f.strip()}
    if args.faults - {"nats", "opencode", "sidecar"}:
        parser.error(f"unknown fault(s): {', '.join(sorted(args.faults - {'nats', 'opencode', 'sidecar'}))}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("bench.faults").setLevel(logging.WARNING)

    async def guarded() -> int:
        main_task = asyncio.current_task()
        assert main_task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
        return await main(args)

    try:
        sys.exit(asyncio.run(guarded()))
    except KeyboardInterrupt:
        sys.exit(130)
    except asyncio.CancelledError:  # SIGTERM
        sys.exit(143)


if __name__ == "__main__":
    entry()
