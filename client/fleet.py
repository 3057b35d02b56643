"""``ocbridge status``: the fleet as NATS sees it, from any machine that reaches NATS.

- **Sidecars**: the heartbeats in the sidecars bucket (:class:`~.protocol.SidecarHeartbeat`). A
  sidecar that stops cleanly deletes its entry; one that dies stops rewriting it and the bucket's
  ``max_age`` (the heartbeat TTL) expires it, so only live sidecars are listed.
- **Queue**: the shared consumer's ``num_pending`` (tasks no sidecar was given yet) and
  ``num_ack_pending`` (given, not yet acknowledged: running or waiting to be redelivered); the
  oldest task no sidecar was given (the first task message after the consumer's delivered
  sequence) and the oldest unacknowledged one (the first after its ack floor; exact for the work
  queue stream ocbridge creates, which deletes acknowledged tasks).
- **Dead letters**: the number of messages in the dead-letter stream.

Read-only: nothing is created. Ages are this machine's clock minus the NATS server's timestamps.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import Any

from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ServiceUnavailableError

from .connection import NatsOptions, connect, redact_nats_url
from .kv import json_object, list_keys
from .protocol import (
    DeadLetterStatus,
    FleetSidecar,
    FleetStatus,
    Naming,
    QueueStatus,
    SidecarHeartbeat,
    ValidationError,
    WaitingTask,
)
from .render import printable

__all__ = ["read_fleet", "render_fleet", "status_command"]

#: Exit code of ``ocbridge status`` when NATS (or JetStream) cannot be reached.
EXIT_UNREACHABLE = 2

_DELETED = {"DEL", "PURGE"}


def _age(when: datetime | None, now: datetime) -> float:
    return max(0.0, (now - when).total_seconds()) if when else 0.0


async def read_sidecars(js: JetStreamContext, naming: Naming, now: datetime) -> list[FleetSidecar]:
    """Every live heartbeat in the sidecars bucket (none when the bucket does not exist yet)."""
    bucket = naming.sidecars_bucket
    try:
        keys = await list_keys(js, bucket)
    except NotFoundError:
        return []

    async def one(key: str) -> FleetSidecar | None:
        try:
            msg = await js.get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.{key}")
        except NotFoundError:  # expired or purged between the listing and now
            return None
        if (msg.headers or {}).get("KV-Operation") in _DELETED or not msg.data:
            return None  # a clean stop's delete marker
        data = json_object(msg.data)
        if data is None:
            return None
        try:
            beat = SidecarHeartbeat.model_validate(data)
        except ValidationError:
            return None
        return FleetSidecar.model_validate({**beat.to_dict(), "age": round(_age(msg.time, now), 3)})

    found = await asyncio.gather(*(one(key) for key in keys))
    return sorted((s for s in found if s is not None), key=lambda s: (s.host, s.id))


async def _task_at(js: JetStreamContext, stream: str, subject: str, after: int, now: datetime) -> WaitingTask | None:
    """The first message on ``subject`` after stream sequence ``after``, or ``None``."""
    try:
        msg = await js.get_msg(stream, max(1, after + 1), subject=subject, next=True)
    except NotFoundError:
        return None
    task_id = (msg.headers or {}).get("Nats-Msg-Id")
    if not task_id:
        body = json_object(msg.data)
        task_id = body.get("taskID") if body and isinstance(body.get("taskID"), str) else None
    enqueued = msg.time or now
    return WaitingTask(taskID=task_id, seq=msg.seq or 0, enqueued=_iso(enqueued), age=round(_age(enqueued, now), 3))


async def read_queue(js: JetStreamContext, naming: Naming, now: datetime) -> QueueStatus:
    """Queue depth and the oldest tasks; what cannot be read is listed in ``problems``."""
    queue = QueueStatus()
    try:
        stream = queue.stream = await js.find_stream_name_by_subject(naming.task_subject)
    except NotFoundError:
        queue.problems.append(f"no stream holds {naming.task_subject}: a task published now is lost "
                              "(run `ocbridge init`, or start a sidecar)")
        return queue
    try:
        info = await js.consumer_info(stream, naming.consumer_name)
    except NotFoundError:
        queue.problems.append(f"no consumer {naming.consumer_name} on stream {stream} yet (`ocbridge init` "
                              "or the first sidecar creates it)")
        counts = (await js.stream_info(stream, subjects_filter=naming.task_subject)).state.subjects or {}
        queue.pending = queue.depth = int(counts.get(naming.task_subject, 0))
        queue.oldest_waiting = queue.oldest_unacked = await _task_at(js, stream, naming.task_subject, 0, now)
        return queue
    queue.consumer = info.name
    queue.pending = info.num_pending or 0
    queue.ack_pending = info.num_ack_pending or 0
    queue.depth = queue.pending + queue.ack_pending
    queue.redelivered = info.num_redelivered or 0
    delivered = info.delivered.stream_seq if info.delivered else 0
    acked = info.ack_floor.stream_seq if info.ack_floor else 0
    if queue.pending:
        queue.oldest_waiting = await _task_at(js, stream, naming.task_subject, delivered, now)
    if queue.depth:
        queue.oldest_unacked = await _task_at(js, stream, naming.task_subject, acked, now)
    return queue


async def read_dead_letters(js: JetStreamContext, naming: Naming) -> DeadLetterStatus:
    try:
        stream = await js.find_stream_name_by_subject(naming.dead_letter)
    except NotFoundError:
        return DeadLetterStatus()
    info = await js.stream_info(stream, subjects_filter=naming.dead_letter)
    count = (info.state.subjects or {}).get(naming.dead_letter, info.state.messages)
    return DeadLetterStatus(stream=stream, messages=int(count))


async def read_fleet(js: JetStreamContext, naming: Naming) -> FleetStatus:
    """The whole fleet view (see the module notes)."""
    now = datetime.now(UTC)
    sidecars, queue, dead = await asyncio.gather(
        read_sidecars(js, naming, now), read_queue(js, naming, now), read_dead_letters(js, naming)
    )
    return FleetStatus(checked=_iso(now), sidecars=sidecars, queue=queue, deadLetters=dead)


# ------------------------------------------------------------------------------------ rendering


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def duration(seconds: float) -> str:
    """``4s``, ``3m05s``, ``2h10m``, ``3d04h``, ``7d``: two units at most, a zero second one left out."""
    s = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            rest = s % size // sub_size
            return f"{s // size}{unit}" + (f"{rest:02d}{sub}" if rest else "")
    return f"{s}s"


def _table(rows: list[list[str]]) -> list[str]:
    rows = [[printable(cell) for cell in row] for row in rows]  # heartbeats are anyone's writes
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _waiting(label: str, task: WaitingTask | None) -> str:
    if task is None:
        return f"{label}: none"
    return f"{label}: {duration(task.age)} (task {printable(task.task_id or '?')}, stream seq {task.seq})"


def render_fleet(status: FleetStatus) -> str:
    """The human view: a table of sidecars, the queue, dead letters."""
    lines = [f"SIDECARS ({len(status.sidecars)})"]
    if status.sidecars:
        rows = [["ID", "HOST", "ENGINE", "VERSION", "USED/FREE", "RUNNING", "HEARTBEAT", "LAST ERROR"]]
        for s in status.sidecars:
            engine = s.engine + ("" if s.engine_healthy else " (unhealthy)")
            state = "" if s.state == "running" else f" ({s.state})"
            error = f"{s.last_error_at or ''} {s.last_error}".strip() if s.last_error else "-"
            rows.append([
                s.id + state, s.host, engine, s.version, f"{s.slots_used}/{s.slots_free}",
                _clip(",".join(s.running_tasks), 40) or "-", f"{duration(s.age)} ago", _clip(error, 80),
            ])
        lines += ["  " + line for line in _table(rows)]
    else:
        lines.append("  none: no sidecar has sent a heartbeat within its TTL")
    q = status.queue
    lines.append("")
    lines.append(f"QUEUE  stream {q.stream or '-'}, consumer {q.consumer or '-'}")
    lines.append(f"  depth {q.depth}: {q.pending} waiting, {q.ack_pending} unacknowledged (running or to be "
                 f"redelivered), {q.redelivered} redelivered")
    lines.append("  " + _waiting("oldest waiting", q.oldest_waiting))
    lines.append("  " + _waiting("oldest unacknowledged", q.oldest_unacked))
    lines += [f"  ! {problem}" for problem in q.problems]
    lines.append("")
    d = status.dead_letters
    lines.append(f"DEAD LETTERS  {d.messages}" + (f" (stream {d.stream})" if d.stream else " (no dead-letter stream)"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- command


async def status_command(options: NatsOptions, naming: Naming, *, as_json: bool = False, timeout: float = 10.0,
                         out: Any = None) -> int:
    """``ocbridge status``: print the fleet; exit 0, or 2 with a message when NATS (or JetStream)
    is not reachable within ``timeout`` seconds."""
    out = out or sys.stdout
    nc = None
    try:
        nc = await connect(options, retry_for=timeout, allow_reconnect=False)
        async with asyncio.timeout(timeout):
            status = await read_fleet(nc.jetstream(timeout=timeout), naming)
    except ConnectionError as exc:
        print(f"ocbridge status: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (TimeoutError, NatsError, OSError) as exc:
        detail = str(exc) or exc.__class__.__name__
        if isinstance(exc, TimeoutError):
            detail = f"no answer within {timeout:g}s"
        elif isinstance(exc, NoRespondersError | ServiceUnavailableError):
            detail = "JetStream is not enabled on this server"
        print(f"ocbridge status: cannot read the fleet from NATS at {redact_nats_url(options.url)}: {detail}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        if nc is not None and not nc.is_closed:
            await nc.close()
    if as_json:
        print(json.dumps(status.to_dict(), indent=2), file=out)
    else:
        print(render_fleet(status), file=out)
    return 0
