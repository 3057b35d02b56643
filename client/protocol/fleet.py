"""The fleet view: each sidecar's heartbeat in KV, and what ``ocbridge status`` reports.

A sidecar rewrites its :class:`SidecarHeartbeat` under its own id in the sidecars bucket
(:attr:`.naming.Naming.sidecars_bucket`) every ``heartbeat_interval`` seconds; the bucket's
``max_age`` is the heartbeat TTL, so the entry of a sidecar that died expires by itself, and a
clean stop deletes it. :class:`FleetStatus` is what ``ocbridge status --json`` prints.
"""

from __future__ import annotations

from pydantic import Field

from .base import WireModel, iso_now

__all__ = ["DeadLetterStatus", "FleetSidecar", "FleetStatus", "QueueStatus", "SidecarHeartbeat", "WaitingTask"]


class SidecarHeartbeat(WireModel):
    """Value of the sidecars bucket, keyed by the sidecar's id (see :func:`.keys.kv_key`)."""

    id: str
    host: str
    pid: int | None = None
    #: The opencode-bridge version the sidecar runs.
    version: str
    #: Which agent runs its prompts (``opencode``, ``opencode-cli``, ``claudecode``...).
    engine: str
    engine_version: str | None = Field(default=None, alias="engineVersion")
    #: Whether the engine takes tasks now (an unhealthy one does not fetch).
    engine_healthy: bool = Field(default=True, alias="engineHealthy")
    #: ``running`` while it takes tasks; ``stopping`` during a graceful stop (a plain string, so
    #: that an older ``ocbridge status`` still lists a newer sidecar's states).
    state: str = "running"
    concurrency: int = Field(ge=0)
    slots_used: int = Field(alias="slotsUsed", ge=0)
    slots_free: int = Field(alias="slotsFree", ge=0)
    #: Ids of the tasks running on it now.
    running_tasks: list[str] = Field(default_factory=list, alias="runningTasks")
    started: str
    updated: str = Field(default_factory=iso_now)
    #: Seconds between heartbeats, and how long one lives without the next.
    interval: float = Field(ge=0)
    ttl: float = Field(ge=0)
    #: The sidecar's latest problem (fetching, its engine, KV, publishing), already redacted.
    last_error: str | None = Field(default=None, alias="lastError")
    last_error_at: str | None = Field(default=None, alias="lastErrorAt")


class FleetSidecar(SidecarHeartbeat):
    """A heartbeat as ``ocbridge status`` saw it."""

    #: Seconds since the heartbeat was stored (by the NATS server's clock).
    age: float


class WaitingTask(WireModel):
    """A task message in the task stream."""

    task_id: str | None = Field(default=None, alias="taskID")
    seq: int
    #: When the stream stored it (ISO 8601, UTC), and how many seconds ago.
    enqueued: str
    age: float


class QueueStatus(WireModel):
    """The task stream and the consumer all sidecars share."""

    stream: str | None = None
    consumer: str | None = None
    #: Tasks no sidecar has been given yet.
    pending: int = 0
    #: Tasks given to a sidecar and not yet acknowledged (running, or waiting for a redelivery).
    ack_pending: int = Field(default=0, alias="ackPending")
    #: ``pending + ackPending``: tasks without a result yet.
    depth: int = 0
    redelivered: int = 0
    #: The oldest task no sidecar has been given yet.
    oldest_waiting: WaitingTask | None = Field(default=None, alias="oldestWaiting")
    #: The oldest task not acknowledged yet (waiting, or running).
    oldest_unacked: WaitingTask | None = Field(default=None, alias="oldestUnacked")
    #: What could not be read (no stream or consumer yet, no permission).
    problems: list[str] = Field(default_factory=list)


class DeadLetterStatus(WireModel):
    stream: str | None = None
    messages: int = 0


class FleetStatus(WireModel):
    """``ocbridge status --json``."""

    checked: str = Field(default_factory=iso_now)
    sidecars: list[FleetSidecar] = Field(default_factory=list)
    queue: QueueStatus = Field(default_factory=QueueStatus)
    dead_letters: DeadLetterStatus = Field(default_factory=DeadLetterStatus, alias="deadLetters")
