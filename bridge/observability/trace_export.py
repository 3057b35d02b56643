"""Where the sidecar's spans go: a ``TracerProvider`` built from the standard ``OTEL_*`` variables.

``OTEL_TRACES_EXPORTER`` (comma-separated) names the exporters: ``otlp`` (protocol from
``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf``, the
default, or ``grpc``), ``console``, ``memory`` (the last spans kept in the process: every cost of
tracing but the network, for benchmarks) and ``none``. Unset means no tracing (the SDK's own
default would be ``otlp``). ``OTEL_SDK_DISABLED=true`` turns it off whatever else is set. The
exporters read their endpoint, headers, timeout and TLS settings from ``OTEL_*`` themselves; the
provider reads the sampler (``OTEL_TRACES_SAMPLER``) and batching (``OTEL_BSP_*``).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Mapping, Sequence
from importlib import metadata

from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)

__all__ = ["DEFAULT_SERVICE_NAME", "RingExporter", "bridge_version", "provider_from_environ", "service_resource"]

log = logging.getLogger(__name__)

#: ``service.name`` unless ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES`` names one.
DEFAULT_SERVICE_NAME = "ocbridge-sidecar"


class RingExporter(SpanExporter):
    """Keeps the last ``limit`` finished spans in memory (``OTEL_TRACES_EXPORTER=memory``);
    nothing leaves the process."""

    def __init__(self, limit: int = 10_000) -> None:
        self.spans: deque[ReadableSpan] = deque(maxlen=limit)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _exporter(kind: str, environ: Mapping[str, str]) -> SpanExporter | None:
    if kind == "console":
        return ConsoleSpanExporter()
    if kind == "memory":
        return RingExporter()
    if kind == "otlp":
        protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            return GrpcExporter()
        if protocol != "http/protobuf":
            log.warning("OTLP protocol %r is not supported: using http/protobuf", protocol)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    log.warning("OTEL_TRACES_EXPORTER: unknown exporter %r ignored (otlp, console, memory, none)", kind)
    return None


def bridge_version() -> str:
    """The installed opencode-bridge version (``unknown`` from a tree that is not installed)."""
    try:
        return metadata.version("opencode-bridge")
    except metadata.PackageNotFoundError:
        return "unknown"


def service_resource(instance_id: str | None) -> Resource:
    """The sidecar's resource: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` win; ours
    (``ocbridge-sidecar``, the package version, the sidecar id) replace the SDK's defaults
    (``unknown_service``, a random instance id)."""
    detected = Resource.create()
    named = {pair.split("=", 1)[0].strip() for pair in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")}
    if os.environ.get("OTEL_SERVICE_NAME"):
        named.add(SERVICE_NAME)
    ours = {SERVICE_NAME: DEFAULT_SERVICE_NAME, SERVICE_VERSION: bridge_version()}
    if instance_id:
        ours[SERVICE_INSTANCE_ID] = instance_id
    return detected.merge(Resource({k: v for k, v in ours.items() if k not in named}))


def provider_from_environ(environ: Mapping[str, str], *, instance_id: str | None = None) -> TracerProvider | None:
    """A provider with a batch processor per exporter ``environ`` names; ``None`` when tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    kinds = list(dict.fromkeys(k.strip().lower() for k in environ.get("OTEL_TRACES_EXPORTER", "").split(",")
                               if k.strip() and k.strip().lower() != "none"))
    exporters = [e for k in kinds if (e := _exporter(k, environ)) is not None]
    if not exporters:
        return None
    provider = TracerProvider(resource=service_resource(instance_id))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing on: %s", ", ".join(kinds))
    return provider
