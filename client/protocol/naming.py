"""Subject and bucket names shared by the client and the sidecar (Station's defaults)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict

#: Which callback subjects a task may name (see :func:`.subjects.callback_problem`):
#: ``own``: exactly ``<stream_prefix>.<taskID>`` and ``<result_prefix>.<taskID>`` (Station's form);
#: ``prefix``: any concrete subject under the two prefixes; ``any``: any concrete subject that is
#: not reserved (the task, cancel, ops and dead-letter subjects, ``$``-prefixed APIs, inboxes).
CallbackScope = Literal["own", "prefix", "any"]

#: How long Station keeps what it stores in its KV buckets and object store (seconds); whoever
#: creates them first (Station, a sidecar, a client) creates them with this TTL and history 1.
STATION_BUCKET_TTL = 7 * 24 * 3600.0


class Naming(BaseModel):
    """Where tasks, events, results, cancels and state live on NATS. All configurable."""

    model_config = ConfigDict(extra="forbid")

    task_subject: str = "station.coding.task"
    stream_prefix: str = "station.coding.stream"
    result_prefix: str = "station.coding.result"
    #: Defaults to ``<task_subject>.cancel``; a cancel for task T goes to ``<prefix>.T``.
    cancel_prefix: str | None = None
    #: Defaults to ``<task_subject>.deadletter``: unreadable tasks are kept there.
    dead_letter_subject: str | None = None
    sessions_bucket: str = "opencode-sessions"
    state_bucket: str = "opencode-state"
    object_store: str = "opencode-files"
    #: Addition: task records (who runs it, its result) so a late watcher can still get a result.
    tasks_bucket: str = "ocbridge-tasks"
    #: Addition: session leases (one task per session across sidecars); ``max_age`` = the lease TTL.
    leases_bucket: str = "ocbridge-leases"
    #: Addition: one heartbeat per running sidecar (``ocbridge status``); ``max_age`` = the heartbeat TTL.
    sidecars_bucket: str = "ocbridge-sidecars"
    stream_name: str = "OCBRIDGE_TASKS"
    dead_letter_stream: str = "OCBRIDGE_DEADLETTER"
    #: Addition: keeps the results published (``<result_prefix>.>``) for a while, so a sidecar
    #: can tell whether a result whose sidecar died was published (see ``bridge.jetstream.journal``).
    results_stream: str = "OCBRIDGE_RESULTS"
    consumer_name: str = "ocbridge-workers"
    #: Queue group of the sidecars answering workspace operations (one answers each request).
    ops_queue: str = "ocbridge-ops"
    #: Which callback subjects a task may name; anything else is dead-lettered, never published to.
    callbacks: CallbackScope = "own"

    def stream_subject(self, task_id: str) -> str:
        return f"{self.stream_prefix}.{task_id}"

    def result_subject(self, task_id: str) -> str:
        return f"{self.result_prefix}.{task_id}"

    def cancel_subject(self, task_id: str) -> str:
        return f"{self.cancel_root}.{task_id}"

    @property
    def cancel_root(self) -> str:
        return self.cancel_prefix or f"{self.task_subject}.cancel"

    @property
    def ops_subject(self) -> str:
        """Request/reply subject for workspace operations (open, close, branch, commit, push...)."""
        return f"{self.task_subject}.ops"

    @property
    def dead_letter(self) -> str:
        return self.dead_letter_subject or f"{self.task_subject}.deadletter"


def naming_from_env(environ: Mapping[str, str]) -> Naming:
    """Names overridden by ``OCBRIDGE_NAMING__<FIELD>`` variables (the sidecar reads the same ones)."""
    prefix = "OCBRIDGE_NAMING__"
    fields = {k[len(prefix):].lower(): v for k, v in environ.items() if k.startswith(prefix)}
    return Naming(**fields)
