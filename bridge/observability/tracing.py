"""OpenTelemetry traces of the sidecar: set-up from ``OTEL_*``, spans, W3C trace context on NATS.

Off unless ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``; ``memory`` keeps the
last spans in the process, for benchmarks; see :mod:`.trace_export`) or :func:`install` gives a
provider. While off, every
helper here returns at once (a shared no-op context; no span, no attribute dict, no header), so
tracing costs nothing measurable.

The tracer comes from a provider this module holds, never from OpenTelemetry's process-wide
global (which can be set only once): the sidecar, its tests and an application embedding it can
each install their own. An application that already set a global SDK provider passes it:
``install(opentelemetry.trace.get_tracer_provider())``.

Span tree of one delivery (``<engine>`` is ``opencode`` or ``claudecode``, as Station names them)::

    client.submit                      (the client, or whatever span the caller had)
      └── <engine>.task                task id, attempt, status, session, workspace, model, tokens, cost
            ├── session.lease          waiting for the session's lease
            ├── workspace.prepare      open the folder, clone/pull, input files, baseline
            │     └── git.<command>    one per git process (clone, fetch, checkout, rev-parse...)
            ├── session.resolve        session record and engine session
            ├── <engine>.prompt        the agent's run
            ├── <engine>.tool.<name>   one per tool call, with the agent's own start and end times
            └── workspace.changes      change report and patch

A message from a caller that traces carries ``traceparent``/``tracestate`` headers: the task span
is its child. Without them (Station) the task starts a new trace. Events and the result carry the
task span's context back in the same headers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ocbridge.bridge.redact import Redactor, default_redactor
from ocbridge.client.protocol import Task, TaskResult, TaskStatus

from .trace_export import DEFAULT_SERVICE_NAME, RingExporter, bridge_version, provider_from_environ, service_resource

if TYPE_CHECKING:  # the git runner imports this module, and the configuration imports the git layer
    from ocbridge.bridge.config import BridgeConfig

__all__ = [
    "DEFAULT_SERVICE_NAME", "RingExporter", "ToolSpans", "add_event", "configure", "configured_model",
    "describe_task", "enabled", "engine_prefix", "extract", "install", "install_memory", "mark_failed",
    "record_error", "remote_parent", "shutdown", "span", "task_prefix", "task_span", "trace_headers",
]

log = logging.getLogger(__name__)

_TRACER_NAME = "ocbridge.bridge"
_W3C = TraceContextTextMapPropagator()
_NOOP = contextlib.nullcontext(INVALID_SPAN)


@dataclass
class _State:
    tracer: trace.Tracer | None = None
    provider: Any = None
    #: The provider was made by :func:`configure` (then :func:`shutdown` flushes it), with this
    #: many users (sidecars in the process).
    owned: bool = False
    users: int = 0
    redactor: Redactor = field(default_factory=lambda: default_redactor)


_state = _State()
#: The task span of the current task: ``(task_id, span, engine prefix)``.
_current_task: ContextVar[tuple[str, Span, str] | None] = ContextVar("ocbridge_task_span", default=None)


# ----------------------------------------------------------------------------------- set-up


def configure(
    *, instance_id: str | None = None, redactor: Redactor | None = None, environ: Mapping[str, str] | None = None
) -> bool:
    """Turn tracing on when the environment asks for it; returns whether tracing is on.

    Reads ``OTEL_SDK_DISABLED``, ``OTEL_TRACES_EXPORTER`` (comma-separated: ``otlp``, ``console``,
    ``memory``, ``none``; unset means off, unlike the SDK's own default), and
    ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` (``http/protobuf`` by default, or ``grpc``). Endpoint,
    headers, sampler (``OTEL_TRACES_SAMPLER``), batching (``OTEL_BSP_*``) and resource attributes
    are the SDK's standard variables; the service name defaults to ``ocbridge-sidecar``.

    A provider given to :func:`install` is kept as it is; a second sidecar in the process shares
    the one already configured. Each successful call needs one :func:`shutdown`.
    """
    environ = os.environ if environ is None else environ
    if _state.provider is not None:
        if redactor is not None:
            _state.redactor = redactor
        if _state.owned:
            _state.users += 1
        return True
    provider = provider_from_environ(environ, instance_id=instance_id)
    if provider is None:
        return False
    install(provider, redactor=redactor)
    _state.owned, _state.users = True, 1
    return True


def install(provider: Any, *, redactor: Redactor | None = None) -> None:
    """Use ``provider`` (an SDK ``TracerProvider``) for the sidecar's spans; ``None`` turns tracing
    off. For tests and embedding applications; the caller keeps ownership (no shutdown here).
    ``redactor`` masks error messages on spans (default: the process-wide one)."""
    _state.provider = provider
    _state.tracer = provider.get_tracer(_TRACER_NAME, bridge_version()) if provider is not None else None
    _state.owned, _state.users = False, 0
    _state.redactor = redactor if redactor is not None else default_redactor


def install_memory() -> InMemorySpanExporter:
    """Install a provider whose spans land, synchronously, in the returned in-memory exporter
    (``exporter.get_finished_spans()``): for tests and for benchmarks run in one process."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=service_resource(None))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    install(provider)
    return exporter


def shutdown() -> None:
    """One user of a configured provider is done; the last one flushes and stops it (blocking up
    to the exporters' timeouts: call it from a thread in async code)."""
    if not _state.owned:
        return
    _state.users -= 1
    if _state.users > 0:
        return
    provider = _state.provider
    install(None)
    try:
        provider.shutdown()
    except Exception as exc:  # an exporter that cannot flush must not break the stop
        log.warning("flushing traces failed: %s", exc)


def enabled() -> bool:
    """Whether spans are recorded (a provider is installed)."""
    return _state.tracer is not None


# ------------------------------------------------------------------------------------- spans


def record_error(span: Span, exc: BaseException) -> None:
    """Mark ``span`` failed by ``exc``, its message redacted (no traceback: it may hold values)."""
    if not span.is_recording():
        return
    message = _state.redactor.text(str(exc))
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {message}" if message else type(exc).__name__))
    span.add_event("exception", {"exception.type": type(exc).__name__, "exception.message": message})


def mark_failed(span: Span, description: str) -> None:
    """Set ``span``'s status to error (a failed result rather than an exception)."""
    if span.is_recording():
        span.set_status(Status(StatusCode.ERROR, _state.redactor.text(description)))


@contextlib.contextmanager
def _recording(name: str, kind: SpanKind, context: Context | None) -> Iterator[Span]:
    assert _state.tracer is not None
    with _state.tracer.start_as_current_span(
        name, context=context, kind=kind, record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield current
        except (GeneratorExit, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            if type(exc).__name__ == "CancelledError":  # a stop or shutdown, not a failure
                current.set_attribute("ocbridge.cancelled", True)
            else:
                record_error(current, exc)
            raise


def span(name: str, *, kind: SpanKind = SpanKind.INTERNAL) -> contextlib.AbstractContextManager[Span]:
    """A child of the current span, current inside the ``with``; a failure marks it (redacted).

    Off: a shared no-op context whose span records nothing. Check ``span.is_recording()`` before
    computing attributes.
    """
    if _state.tracer is None:
        return _NOOP
    return _recording(name, kind, None)


def engine_prefix(engine: str) -> str:
    """Station's span prefix for an engine: ``claudecode`` or ``opencode``."""
    return "claudecode" if engine.startswith("claude") else "opencode"


@contextlib.contextmanager
def task_span(task_id: str, *, engine: str, parent: Context | None = None) -> Iterator[Span]:
    """The span of one delivery of a task (``<engine>.task``), current inside the ``with``.

    Re-entrant: inside the span of the same task (the worker opens it, the pipeline enters it
    again) it yields that span. ``parent``: the caller's context from the message headers
    (:func:`extract`); ``None`` starts a new trace. Off, a caller's context is still made current,
    so log records carry the caller's trace id.
    """
    held = _current_task.get()
    if held is not None and held[0] == task_id:
        yield held[1]
        return
    if _state.tracer is None:
        if parent is None:
            yield INVALID_SPAN
            return
        token = otel_context.attach(parent)
        try:
            yield trace.get_current_span()
        finally:
            otel_context.detach(token)
        return
    prefix = engine_prefix(engine)
    with _recording(f"{prefix}.task", SpanKind.CONSUMER, parent) as current:
        current.set_attribute(f"{prefix}.task_id", task_id)
        mark = _current_task.set((task_id, current, prefix))
        try:
            yield current
        finally:
            _current_task.reset(mark)


def task_prefix() -> str:
    """The engine prefix of the current task span (``opencode`` outside one)."""
    held = _current_task.get()
    return held[2] if held is not None else "opencode"


def configured_model(config: BridgeConfig) -> str | None:
    """The engine's configured model (a task's own ``model`` wins), for the task's attributes."""
    if config.engine == "claudecode":
        return config.claudecode.model
    if config.engine == "opencode-cli":
        return config.opencode_cli.model or config.opencode.model
    return config.opencode.model


def describe_task(task: Task, result: TaskResult, *, attempt: int | None = None, model: str | None = None) -> None:
    """The current task span's attributes from its result, as Station's PRD names them
    (``opencode.session_id``, ``opencode.tokens.input``...), plus task id, status, attempt; failed
    and timed-out tasks mark the span failed with their error type."""
    held = _current_task.get()
    if held is None or held[0] != task.task_id or not held[1].is_recording():
        return
    span, p = held[1], held[2]
    metrics = result.metrics
    attributes: dict[str, str | int | float | bool] = {
        f"{p}.task_id": result.task_id,
        f"{p}.status": str(result.status.value),
        f"{p}.session_name": task.session.name,
        f"{p}.workspace_name": task.workspace.name,
        f"{p}.tool_calls": metrics.tool_calls,
        f"{p}.tokens.input": metrics.prompt_tokens,
        f"{p}.tokens.output": metrics.completion_tokens,
        f"{p}.cost": float(metrics.cost or 0.0),
        f"{p}.events": metrics.stream_events,
    }
    if attempt is not None:
        attributes[f"{p}.attempt"] = attempt
    if result.session is not None and result.session.opencode_id:
        attributes[f"{p}.session_id"] = result.session.opencode_id
    if result.workspace is not None and result.workspace.path:
        attributes[f"{p}.workspace"] = result.workspace.path
    model = str(task.model) if task.model else model
    if model:
        provider, _, name = model.rpartition("/")
        attributes[f"{p}.model"] = name
        if provider or p == "claudecode":
            attributes[f"{p}.provider"] = provider or "anthropic"
    if result.error_type:
        attributes[f"{p}.error_type"] = str(result.error_type)
    span.set_attributes(attributes)
    if result.status in (TaskStatus.ERROR, TaskStatus.TIMEOUT):
        span.set_status(Status(StatusCode.ERROR, str(result.error_type or result.status.value)))


def extract(headers: Mapping[str, str] | None) -> Context | None:
    """The caller's trace context from NATS message headers, ``None`` when there is none."""
    if not headers or "traceparent" not in headers:
        return None
    found = _W3C.extract(headers)
    return found if trace.get_current_span(found).get_span_context().is_valid else None


@contextlib.contextmanager
def remote_parent(headers: Mapping[str, str] | None) -> Iterator[None]:
    """Inside the ``with``, new spans are children of the caller's span named in ``headers``
    (a request's ``traceparent``); nothing happens when off or without one."""
    parent = extract(headers) if _state.tracer is not None else None
    if parent is None:
        yield
        return
    token = otel_context.attach(parent)
    try:
        yield
    finally:
        otel_context.detach(token)


def trace_headers() -> dict[str, str] | None:
    """``traceparent`` (and ``tracestate``) of the current span for outgoing messages; ``None``
    when nothing is recorded."""
    if _state.tracer is None or not trace.get_current_span().is_recording():
        return None
    headers: dict[str, str] = {}
    _W3C.inject(headers)
    return headers or None


def add_event(name: str, attributes: Mapping[str, str | int | float | bool] | None = None) -> None:
    """An event on the current span (a task given back, a result republished...)."""
    current = trace.get_current_span()
    if current.is_recording():
        current.add_event(name, dict(attributes or {}))


# -------------------------------------------------------------------------------- tool spans


def _ns(seconds: float | None) -> int | None:
    return int(seconds * 1e9) if seconds is not None else None


class ToolSpans:
    """One span per agent tool call, children of the task span, with the agent's own start and
    end times (the receipt times of the events when the engine reports none).

    ``ToolSpans.for_current_task()`` is a no-op object when the task span records nothing.
    """

    def __init__(self, task: Span, prefix: str) -> None:
        self._context = trace.set_span_in_context(task)
        self._prefix = prefix
        self._open: dict[str, tuple[str, int]] = {}

    @staticmethod
    def for_current_task() -> ToolSpans | None:
        held = _current_task.get()
        if _state.tracer is None or held is None or not held[1].is_recording():
            return None
        return ToolSpans(held[1], held[2])

    def start(self, call_id: str, name: str, started_at: float | None) -> None:
        self._open[call_id] = (name, _ns(started_at) or time.time_ns())

    def end(self, call_id: str, name: str, *, started_at: float | None = None, ended_at: float | None = None,
            duration_ms: int | None = None, error: bool | None = None) -> None:
        _, opened = self._open.pop(call_id, (name, None))
        start = _ns(started_at) or opened or time.time_ns()
        end = _ns(ended_at) or (start + duration_ms * 1_000_000 if duration_ms else time.time_ns())
        self._record(name, call_id, start, max(end, start), error=bool(error), finished=True)

    def close(self) -> None:
        """Tools still open when the run ended (aborted): their spans end now."""
        for call_id, (name, start) in self._open.items():
            self._record(name, call_id, start, max(time.time_ns(), start), error=True, finished=False)
        self._open.clear()

    def _record(self, name: str, call_id: str, start: int, end: int, *, error: bool, finished: bool) -> None:
        assert _state.tracer is not None
        tool = _state.tracer.start_span(
            f"{self._prefix}.tool.{name}", context=self._context, start_time=start,
            attributes={"tool.name": name, "tool.call_id": call_id, "tool.finished": finished},
        )
        if error:
            tool.set_status(Status(StatusCode.ERROR, "the tool failed" if finished else "the run ended first"))
        tool.end(end_time=end)
