"""Subject and bucket names shared by the client and the sidecar (Station's defaults)."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict


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
    stream_name: str = "OCBRIDGE_TASKS"
    dead_letter_stream: str = "OCBRIDGE_DEADLETTER"
    consumer_name: str = "ocbridge-workers"
    #: Queue group of the sidecars answering workspace operations (one answers each request).
    ops_queue: str = "ocbridge-ops"

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
