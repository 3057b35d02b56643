"""Helpers for the fault tests: an agent that records its runs, a result oracle that survives a NATS
restart, a "nothing more can come" check, and a scripted sidecar as a child process (to SIGKILL).

- :class:`RunLog` / :func:`recording_engine`: a :class:`ScriptedEngine` whose prompt is
  ``"<marker> <seconds>"``; every run appends ``start`` (and, unless it was aborted or its process
  killed, ``end``) lines to a shared JSON-lines file, so runs are counted across processes.
- :class:`ResultLog`: a JetStream stream over ``<result prefix>.>`` (the sidecars' result journal,
  or one of its own when it starts first): every result that reached the server is kept, even
  while the test's own connection was reconnecting.
- :func:`settled`: the task stream's consumer has nothing pending or unacknowledged, the
  (work-queue) stream is empty, no in-process sidecar is still handling a delivery and no session
  lease is held. A sidecar publishes a result only while it handles a delivery, so from then on no
  further result can appear: "nothing more" without a bare sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import KeyNotFoundError, NotFoundError

from ocbridge.bridge.engines.base import PromptRequest
from ocbridge.bridge.engines.scripted import Delay, ScriptedEngine, Step
from ocbridge.client.protocol import Naming, TaskRecord, TaskResult, kv_key, record_key

from .stack import ROOT, SidecarProcess

SUPPORT = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------- the agent


class RunLog:
    """Runs of :func:`recording_engine` agents, one JSON line per start and end, in ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **entry: Any) -> None:
        line = json.dumps({**entry, "t": time.time()}) + "\n"
        with self.path.open("a") as handle:  # one small append: lines of processes never interleave
            handle.write(line)

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def starts(self) -> Counter[str]:
        return Counter(e["marker"] for e in self.entries() if e["event"] == "start")

    def ends(self) -> Counter[str]:
        return Counter(e["marker"] for e in self.entries() if e["event"] == "end")

    def intervals(self, marker_prefix: str = "") -> list[tuple[float, float, str, str]]:
        """``(start, end, marker, sidecar)`` of every run that ended, by start time."""
        starts: dict[tuple[str, str], float] = {}
        out = []
        for e in self.entries():
            if not e["marker"].startswith(marker_prefix):
                continue
            key = (e["marker"], e["run"])
            if e["event"] == "start":
                starts[key] = e["t"]
            elif key in starts:
                out.append((starts[key], e["t"], e["marker"], e["sidecar"]))
        return sorted(out)


def recording_engine(log: RunLog, sidecar: str) -> ScriptedEngine:
    """A ScriptedEngine for prompts ``"<marker> <seconds>"``: records the run's start, waits, records
    its end and answers ``done <marker>``. An aborted run records no end."""
    counter = iter(range(1, 1_000_000))

    async def script(request: PromptRequest) -> AsyncIterator[Step]:
        marker, _, seconds = request.prompt.partition(" ")
        run = f"{sidecar}-{os.getpid()}-{next(counter)}"
        log.write(event="start", marker=marker, sidecar=sidecar, run=run, session=request.session_id)
        yield Delay(float(seconds or 0))
        log.write(event="end", marker=marker, sidecar=sidecar, run=run)
        yield f"done {marker}"

    return ScriptedEngine(script)


# ------------------------------------------------------------------------------------- the tasks


def task_body(naming: Naming, task_id: str, prompt: str, *, session: str | None = None,
              workspace: str | None = None, **fields: Any) -> dict[str, Any]:
    body = {
        "taskID": task_id,
        "session": {"name": session or f"s-{task_id}"},
        "workspace": {"name": workspace or f"ws-{task_id}"},
        "prompt": prompt,
        "callback": {
            "streamSubject": naming.stream_subject(task_id),
            "resultSubject": naming.result_subject(task_id),
        },
    }
    body.update(fields)
    return body


async def publish_task(js: JetStreamContext, naming: Naming, body: dict[str, Any]) -> None:
    """Publish as Station does (no message id), confirmed stored by the stream."""
    await js.publish(naming.task_subject, json.dumps(body).encode(), timeout=10)


async def task_record(js: JetStreamContext, naming: Naming, task_id: str) -> TaskRecord | None:
    kv = await js.key_value(naming.tasks_bucket)
    try:
        entry = await kv.get(record_key(task_id))
    except NotFoundError:
        return None
    return TaskRecord.model_validate_json(entry.value) if entry and entry.value else None


# ------------------------------------------------------------------------------------ the oracle


class ResultLog:
    """Every message published under ``<result prefix>.>``, kept by the stream over those subjects
    (NATS allows one): the sidecars' result journal, or one of its own made before any sidecar ran."""

    def __init__(self, js: JetStreamContext, naming: Naming) -> None:
        self.js = js
        self.naming = naming
        self.stream = f"RESULTS_{naming.stream_name}"

    async def start(self) -> ResultLog:
        subjects = f"{self.naming.result_prefix}.>"
        try:  # a sidecar's result journal keeps them already (one stream per subjects)
            self.stream = await self.js.find_stream_name_by_subject(subjects)
        except NotFoundError:
            await self.js.add_stream(name=self.stream, subjects=[subjects], storage=api.StorageType.FILE)
        return self

    async def messages(self) -> list[tuple[str, bytes]]:
        info = await self.js.stream_info(self.stream)
        out = []
        if info.state.messages:
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await self.js.get_msg(self.stream, seq)
                out.append((msg.subject, msg.data or b""))
        return out

    async def counts(self) -> Counter[str]:
        """Results per task id."""
        prefix = self.naming.result_prefix + "."
        return Counter(subject[len(prefix):] for subject, _ in await self.messages())

    async def results(self) -> dict[str, list[TaskResult]]:
        prefix = self.naming.result_prefix + "."
        out: dict[str, list[TaskResult]] = {}
        for subject, data in await self.messages():
            out.setdefault(subject[len(prefix):], []).append(TaskResult.from_wire(data))
        return out

    async def wait_for(self, task_ids: list[str], timeout: float) -> Counter[str]:
        """Wait until every task has at least one result; returns the counts."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                counts = await self.counts()
            except Exception:  # NATS restarting: ask again
                counts = Counter()
            missing = [t for t in task_ids if not counts[t]]
            if not missing:
                return counts
            if time.monotonic() > deadline:
                raise AssertionError(f"no result within {timeout:.0f}s for {missing} (have {dict(counts)})")
            await asyncio.sleep(0.2)


async def settled(js: JetStreamContext, naming: Naming, timeout: float = 60.0, *, sidecars: Iterable[Any] = (),
                  sessions: Iterable[str] = ()) -> None:
    """Wait until nothing can publish a result any more.

    Every task message is acknowledged or terminated (none pending, none delivered and
    unacknowledged: a nak'd one still counts; the work-queue stream empty), no in-process
    ``sidecars`` still handles a delivery (a second copy of a message that another sidecar has
    acknowledged meanwhile is still being handled), and no lease of ``sessions`` is held (a copy in
    another process runs only under its session's lease).
    """
    sidecars, sessions = list(sidecars), list(sessions)
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = await js.consumer_info(naming.stream_name, naming.consumer_name)
            stream = await js.stream_info(naming.stream_name)
            busy = [s.id for s in sidecars if s.worker is not None and s.worker._handlers]
            held = [name for name in sessions if await _lease_held(js, naming, name)]
            if info.num_pending == 0 and info.num_ack_pending == 0 and stream.state.messages == 0 and not busy \
                    and not held:
                return
            state = (f"pending {info.num_pending}, unacked {info.num_ack_pending}, in stream "
                     f"{stream.state.messages}, sidecars handling {busy}, leases held {held}")
        except Exception as exc:
            state = repr(exc)
        if time.monotonic() > deadline:
            raise AssertionError(f"tasks not settled within {timeout:.0f}s: {state}")
        await asyncio.sleep(0.1)


async def _lease_held(js: JetStreamContext, naming: Naming, session: str) -> bool:
    kv = await js.key_value(naming.leases_bucket)
    try:
        entry = await kv.get(kv_key(session))
    except KeyNotFoundError:
        return False
    return bool(entry and entry.value)


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


async def connect_fast(url: str) -> NATS:
    """A test connection that reconnects quickly and for ever (it outlives NATS restarts)."""
    import nats

    async def quiet(exc: Exception) -> None:  # "connection refused" while NATS restarts: expected
        pass

    return await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2,
                              error_cb=quiet)


# ------------------------------------------------------------------------- a scripted child sidecar


class ScriptedSidecarProcess(SidecarProcess):
    """A sidecar with :func:`recording_engine` as a child process (``support/scripted_serve.py``):
    the real worker, JetStream and KV code, an agent that needs no OpenCode. ``kill()`` SIGKILLs it."""

    def __init__(self, config_file: Path, log_file: Path, runs: Path, name: str) -> None:
        super().__init__(config_file, log_file)
        self.runs = runs
        self.name = name

    @classmethod
    def configure(cls, tmp: Path, name: str, config: dict[str, Any], runs: Path) -> ScriptedSidecarProcess:
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return cls(path, tmp / f"{name}.log", runs, name)

    async def start(self, ready_timeout: float = 60.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OCBRIDGE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), env.get("PYTHONPATH")]))
        log = self.log_file.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SUPPORT / "scripted_serve.py"), str(self.config_file), str(self.runs), self.name,
            stdout=log, stderr=log, env=env, start_new_session=True,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ready_timeout
        while "ready; workspaces under" not in self.log_file.read_text(errors="replace"):
            if self.proc.returncode is not None or loop.time() > deadline:
                raise RuntimeError(f"sidecar did not start:\n{self.log_file.read_text(errors='replace')[-3000:]}")
            await asyncio.sleep(0.05)
