"""The sidecar's metrics: OpenTelemetry instruments, read as Prometheus text on the health/metrics
listener (``/metrics``) and pushed over OTLP when ``OTEL_METRICS_EXPORTER`` names ``otlp``.

Metrics are off unless ``observability.http_port`` is set or ``OTEL_METRICS_EXPORTER`` names an
exporter (``otlp``, ``console``): then the sidecar holds :data:`NO_METRICS`, whose methods do
nothing and which imports nothing of OpenTelemetry. When on, every sidecar has its own
``MeterProvider`` and its own Prometheus ``CollectorRegistry`` (never the global ones), so several
sidecars can live in one process.

The worker and the pipeline call one method where an outcome is decided (:class:`TaskMetrics`);
gauges (active tasks, free slots, OpenCode's memory and restarts) are read when collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ocbridge.client.protocol import ErrorType, TaskResult, TaskStatus

if TYPE_CHECKING:
    from ocbridge.bridge.config import BridgeConfig
    from ocbridge.bridge.engines.base import Engine, EventSink

__all__ = ["METRIC_NAMES", "NO_METRICS", "OTelMetrics", "TaskMetrics", "build_metrics", "metrics_exporters"]

log = logging.getLogger(__name__)

#: The instrumentation scope, also the service name when ``OTEL_SERVICE_NAME`` names none.
SCOPE = "ocbridge"

#: Every metric as Prometheus names it, with what it counts (the README's table comes from here).
METRIC_NAMES: dict[str, str] = {
    "ocbridge_tasks_received_total": "task messages delivered to this sidecar (redeliveries included)",
    "ocbridge_tasks_completed_total": "tasks answered with status completed",
    "ocbridge_tasks_failed_total": "tasks answered with status error, by error_type",
    "ocbridge_tasks_cancelled_total": "tasks answered with status cancelled",
    "ocbridge_tasks_timed_out_total": "tasks answered with status timeout",
    "ocbridge_tasks_retried_total": "tasks given back without a result (not their fault: engine or KV unavailable, "
                                    "shutdown), to run again later",
    "ocbridge_task_duration_seconds": "histogram of task run time (the result's duration), by status and engine",
    "ocbridge_queue_wait_seconds": "histogram of time from publish (the stream's timestamp) to the task's first run",
    "ocbridge_time_to_first_event_seconds": "histogram of time from sending the prompt to the agent's first event "
                                            "(text, thinking or tool), by engine",
    "ocbridge_tokens_total": "tokens of answered tasks, by type (input, output)",
    "ocbridge_cost_usd_total": "cost of answered tasks as the engine reports it",
    "ocbridge_redeliveries_total": "deliveries of a message seen before (give-backs, naks, ack_wait expiries)",
    "ocbridge_dead_letters_total": "messages dead-lettered (unreadable, or naming subjects they may not)",
    "ocbridge_opencode_restarts_total": "restarts of the managed opencode serve by its supervisor",
    "ocbridge_tasks_active": "deliveries being handled now (slots in use)",
    "ocbridge_slots_free": "free slots (concurrency minus active)",
    "ocbridge_opencode_rss_bytes": "resident memory of the managed opencode serve and its child processes",
}

#: Histogram buckets in seconds: agent runs last seconds to an hour; waits and first events less.
_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
_WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_FIRST_EVENT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ERROR_TYPES = frozenset(e.value for e in ErrorType)


class TaskMetrics:
    """What the worker and the pipeline report. This base class is the "off" implementation: every
    method does nothing (:data:`NO_METRICS`); :class:`OTelMetrics` records."""

    #: Whether anything is recorded.
    enabled = False

    def received(self, deliveries: int) -> None:
        """A task message was delivered (``deliveries``: its ``num_delivered``)."""

    def queue_wait(self, published: datetime.datetime | None) -> None:
        """A task starts its first run; ``published`` is when the stream stored it."""

    def finished(self, result: TaskResult) -> None:
        """A task's one result is decided (stored, about to be published)."""

    def gave_back(self) -> None:
        """A task was handed back without a result, to run again later."""

    def dead_lettered(self) -> None:
        """A message was dead-lettered."""

    def first_event(self, sink: EventSink) -> EventSink:
        """``sink`` wrapped to time the prompt's first agent event (call as the prompt is sent)."""
        return sink

    def watch(self, *, engine: Callable[[], Engine | None], running: Callable[[], int], slots: int) -> None:
        """Read at collection time: the engine (its name, OpenCode's process), deliveries being
        handled, and the concurrency they share."""

    def prometheus_text(self) -> tuple[bytes, str] | None:
        """The metrics in Prometheus text format and its content type; ``None`` when off. Blocking
        (it runs the gauges' callbacks): call it in a thread."""
        return None

    async def aclose(self) -> None:
        """Flush the exporters and stop them."""


#: The metrics of a sidecar that has them off.
NO_METRICS = TaskMetrics()


def metrics_exporters(environ: Mapping[str, str] | None = None) -> set[str]:
    """The push exporters ``OTEL_METRICS_EXPORTER`` names (comma-separated; ``none`` and unknown
    names dropped, ``prometheus`` served by the listener)."""
    environ = os.environ if environ is None else environ
    names = {n.strip().lower() for n in environ.get("OTEL_METRICS_EXPORTER", "").split(",") if n.strip()}
    return names & {"otlp", "console"}


def build_metrics(
    config: BridgeConfig, *, instance: str, environ: Mapping[str, str] | None = None
) -> TaskMetrics:
    """The sidecar's metrics: :class:`OTelMetrics` when the listener's port is configured or an
    exporter is named, else :data:`NO_METRICS`. ``instance`` is the sidecar's id
    (``service.instance.id``)."""
    environ = os.environ if environ is None else environ
    exporters = metrics_exporters(environ)
    prometheus = config.observability.http_port is not None
    if "prometheus" in environ.get("OTEL_METRICS_EXPORTER", "").lower() and not prometheus:
        log.warning("OTEL_METRICS_EXPORTER names prometheus: /metrics is served on observability.http_port "
                    "(OCBRIDGE_HTTP_PORT), which is not set")
    if not prometheus and not exporters:
        return NO_METRICS
    return OTelMetrics(instance=instance, prometheus=prometheus, exporters=exporters, environ=environ)


class OTelMetrics(TaskMetrics):
    """Records into its own OpenTelemetry ``MeterProvider``: a Prometheus reader on its own
    registry when ``prometheus``, periodic readers for the named push ``exporters``."""

    enabled = True

    def __init__(
        self, *, instance: str, prometheus: bool = True, exporters: set[str] | frozenset[str] = frozenset(),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource

        environ = os.environ if environ is None else environ
        readers: list[Any] = []
        self._registry = None
        if prometheus:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry(auto_describe=True)
            readers.append(PrometheusMetricReader(scope_info_enabled=False, registry=self._registry))
        readers.extend(_push_reader(name, environ) for name in sorted(exporters))
        # Resource.create reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; "ocbridge" only
        # when they name no service.
        resource = Resource.create({"service.instance.id": instance})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SCOPE}))
        self._provider = MeterProvider(metric_readers=readers, resource=resource)
        self._engine: Callable[[], Engine | None] = lambda: None
        self._running: Callable[[], int] = lambda: 0
        self._slots = 0
        self._create_instruments()

    def _create_instruments(self) -> None:
        from opentelemetry.metrics import CallbackOptions, Observation

        meter = self._provider.get_meter(SCOPE)
        counter = meter.create_counter
        self._received = counter("ocbridge.tasks.received", "{task}", "Task messages delivered to this sidecar")
        self._completed = counter("ocbridge.tasks.completed", "{task}", "Tasks answered with status completed")
        self._failed = counter("ocbridge.tasks.failed", "{task}", "Tasks answered with status error")
        self._cancelled = counter("ocbridge.tasks.cancelled", "{task}", "Tasks answered with status cancelled")
        self._timed_out = counter("ocbridge.tasks.timed_out", "{task}", "Tasks answered with status timeout")
        self._retried = counter("ocbridge.tasks.retried", "{task}", "Tasks given back without a result")
        self._redeliveries = counter("ocbridge.redeliveries", "{delivery}", "Deliveries of a message seen before")
        self._dead_letters = counter("ocbridge.dead_letters", "{message}", "Messages dead-lettered")
        self._tokens = counter("ocbridge.tokens", "{token}", "Tokens of answered tasks, by type")
        self._cost = counter("ocbridge.cost.usd", "{USD}", "Cost of answered tasks as the engine reports it")
        # Series that exist from the start read 0 rather than missing until the first event.
        for instrument in (self._received, self._completed, self._cancelled, self._timed_out, self._retried,
                           self._redeliveries, self._dead_letters, self._cost):
            instrument.add(0)
        for kind in ("input", "output"):
            self._tokens.add(0, {"type": kind})
        self._duration = meter.create_histogram(
            "ocbridge.task.duration", "s", "Task run time, by status and engine",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS)
        self._queue_wait = meter.create_histogram(
            "ocbridge.queue.wait", "s", "Time from publish to the task's first run",
            explicit_bucket_boundaries_advisory=_WAIT_BUCKETS)
        self._first_event = meter.create_histogram(
            "ocbridge.time_to_first_event", "s", "Time from sending the prompt to the agent's first event",
            explicit_bucket_boundaries_advisory=_FIRST_EVENT_BUCKETS)

        def observe(read: Callable[[], float | None]) -> Callable[[CallbackOptions], list[Observation]]:
            def callback(options: CallbackOptions) -> list[Observation]:
                try:
                    value = read()
                except Exception as exc:  # a gauge must never break the whole collection
                    log.debug("metric callback failed: %r", exc)
                    return []
                return [] if value is None else [Observation(value)]
            return callback

        meter.create_observable_gauge("ocbridge.tasks.active", [observe(lambda: self._running())], "{task}",
                                      "Deliveries being handled now (slots in use)")
        meter.create_observable_gauge("ocbridge.slots.free", [observe(lambda: self._slots - self._running())],
                                      "{slot}", "Free slots (concurrency minus active)")
        meter.create_observable_counter("ocbridge.opencode.restarts", [observe(self._restarts)], "{restart}",
                                        "Restarts of the managed opencode serve by its supervisor")
        meter.create_observable_gauge("ocbridge.opencode.rss", [observe(self._rss)], "By",
                                      "Resident memory of the managed opencode serve and its child processes")

    # -------------------------------------------------------------------------- what happened

    def received(self, deliveries: int) -> None:
        self._received.add(1)
        if deliveries > 1:
            self._redeliveries.add(1)

    def queue_wait(self, published: datetime.datetime | None) -> None:
        if published is not None:
            # The server's clock against ours: a skew must not record a negative wait.
            waited = datetime.datetime.now(datetime.UTC) - published
            self._queue_wait.record(max(waited.total_seconds(), 0.0))

    def finished(self, result: TaskResult) -> None:
        status = TaskStatus(result.status)
        if status == TaskStatus.COMPLETED:
            self._completed.add(1)
        elif status == TaskStatus.CANCELLED:
            self._cancelled.add(1)
        elif status == TaskStatus.TIMEOUT:
            self._timed_out.add(1)
        else:
            # error_type is open on the wire: unknown values share one series (bounded cardinality).
            kind = str(result.error_type or ErrorType.INTERNAL_ERROR)
            self._failed.add(1, {"error_type": kind if kind in _ERROR_TYPES else "other"})
        metrics = result.metrics
        self._duration.record(metrics.duration / 1000, {"status": status.value, "engine": self._engine_name()})
        self._tokens.add(metrics.prompt_tokens, {"type": "input"})
        self._tokens.add(metrics.completion_tokens, {"type": "output"})
        if metrics.cost:
            self._cost.add(metrics.cost)

    def gave_back(self) -> None:
        self._retried.add(1)

    def dead_lettered(self) -> None:
        self._dead_letters.add(1)

    def first_event(self, sink: EventSink) -> EventSink:
        sent = time.monotonic()
        seen = False

        async def timed(event):  # type: ignore[no-untyped-def]
            nonlocal seen
            if not seen:
                seen = True
                self._first_event.record(time.monotonic() - sent, {"engine": self._engine_name()})
            await sink(event)

        return timed

    # ----------------------------------------------------------------------------- gauges

    def watch(self, *, engine: Callable[[], Engine | None], running: Callable[[], int], slots: int) -> None:
        self._engine, self._running, self._slots = engine, running, slots

    def _engine_name(self) -> str:
        engine = self._engine()
        return engine.name if engine is not None else "unknown"

    def _opencode_process(self) -> Any:
        """The managed ``opencode serve`` supervisor of an OpenCode engine, else ``None``."""
        return getattr(self._engine(), "process", None)

    def _restarts(self) -> int | None:
        process = self._opencode_process()
        return getattr(process, "restarts", None)

    def _rss(self) -> int | None:
        process = self._opencode_process()
        pid = getattr(process, "pid", None)
        if pid is None:
            return None
        import psutil

        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:  # between a crash and the restart
            return None
        total = 0
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    # ---------------------------------------------------------------------------- export

    def prometheus_text(self) -> tuple[bytes, str] | None:
        if self._registry is None:
            return None
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    async def aclose(self) -> None:
        """Shut the provider down (a last push to the OTLP exporters; the Prometheus reader leaves
        its registry), within 10 seconds whatever the collector does."""
        provider, self._provider = self._provider, None
        if provider is None:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(provider.shutdown, timeout_millis=8_000), 10)
        except Exception as exc:
            log.warning("stopping the metrics exporters failed: %s", exc)


def _push_reader(name: str, environ: Mapping[str, str]) -> Any:
    """A periodic reader for ``otlp`` (the protocol from ``OTEL_EXPORTER_OTLP_METRICS_PROTOCOL`` or
    ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf``, the default, or ``grpc``) or ``console``.
    Endpoint, headers and interval come from the standard ``OTEL_*`` variables."""
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    if name == "console":
        return PeriodicExportingMetricReader(ConsoleMetricExporter())
    protocol = (environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        if protocol != "http/protobuf":
            log.warning("OTLP protocol %r is not supported for metrics; using http/protobuf", protocol)
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return PeriodicExportingMetricReader(OTLPMetricExporter())
