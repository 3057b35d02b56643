"""Trace context on the client's NATS messages: optional, with ``opentelemetry-api`` installed
(``pip install 'opencode-bridge[tracing]'``); without it every function here is a no-op.

:meth:`CodingClient.submit` runs in a ``client.submit`` span (a child of the caller's current
span) and puts its W3C ``traceparent``/``tracestate`` into the task message's NATS headers, so the
sidecar's task span is its child. The sidecar sends its task span's context back in the headers
of the events and the result: :attr:`TaskHandle.trace_id` names the trace, and the arrival of the
result is a ``client.result`` span under the sidecar's task span. The JSON bodies are unchanged:
Station, which sends no headers, and sidecars that send none work as before.

Spans go to OpenTelemetry's global tracer provider (the application's), or to the one given to
:func:`set_tracer_provider`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the client works without OpenTelemetry
    trace = None  # type: ignore[assignment]

__all__ = ["available", "result_span", "send_span", "set_tracer_provider", "trace_id_of"]

_NAME = "ocbridge.client"
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_provider: Any = None
_W3C = TraceContextTextMapPropagator() if trace is not None else None


def available() -> bool:
    """Whether ``opentelemetry-api`` is installed (spans and headers are possible)."""
    return trace is not None


def set_tracer_provider(provider: Any) -> None:
    """Use ``provider`` for the client's spans instead of the global one (``None``: the global
    one again). For tests and applications that keep their provider to themselves."""
    global _provider
    _provider = provider


def _tracer() -> Any:
    """The tracer, ``None`` when nothing would be recorded (no OpenTelemetry, or no provider set
    anywhere): then the client does no tracing work at all."""
    if trace is None:
        return None
    if _provider is not None:
        return _provider.get_tracer(_NAME)
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None
    return trace.get_tracer(_NAME)


def trace_id_of(headers: Mapping[str, str] | None) -> str | None:
    """The trace id (32 hex digits) in a message's ``traceparent`` header; no OpenTelemetry needed."""
    value = (headers or {}).get("traceparent")
    match = _TRACEPARENT.match(value.strip().lower()) if isinstance(value, str) else None
    return match.group(1) if match and match.group(1) != "0" * 32 else None


@contextlib.contextmanager
def send_span(name: str, attributes: Mapping[str, str]) -> Iterator[dict[str, str]]:
    """A producer span (``client.submit``, ``client.op``) around sending a message; yields the
    headers to send with it (``traceparent``/``tracestate``, empty when nothing is traced)."""
    tracer = _tracer()
    if tracer is None:
        yield {}
        return
    with tracer.start_as_current_span(
        name, kind=SpanKind.PRODUCER, record_exception=False, set_status_on_exception=False
    ) as span:
        if span.is_recording():
            span.set_attributes({"messaging.system": "nats", **attributes})
        headers: dict[str, str] = {}
        _W3C.inject(headers)
        try:
            yield headers
        except BaseException as exc:
            # The type only: a message may quote the task, and the client has no redactor.
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise


@contextlib.contextmanager
def result_span(task_id: str, headers: Mapping[str, str] | None,
                submitted: Mapping[str, str] | None) -> Iterator[Any]:
    """The ``client.result`` span around reading a result: a child of the sidecar's task span
    (the result's headers), else of ``client.submit`` (``submitted``, the task's headers), linked
    to ``client.submit`` when both are known. Yields the span (``None`` without OpenTelemetry)."""
    tracer = _tracer()
    if tracer is None or not (headers or submitted):
        yield None
        return
    sidecar = _W3C.extract(dict(headers)) if headers and "traceparent" in headers else None
    ours = _W3C.extract(dict(submitted)) if submitted and "traceparent" in submitted else None
    links = []
    if sidecar is not None and ours is not None:
        links = [Link(trace.get_current_span(ours).get_span_context())]
    with tracer.start_as_current_span(
        "client.result", context=sidecar if sidecar is not None else ours, kind=SpanKind.CONSUMER, links=links,
        record_exception=False, set_status_on_exception=False,
    ) as span:
        if span.is_recording():
            span.set_attribute("ocbridge.task_id", task_id)
        yield span
