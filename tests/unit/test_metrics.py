"""The metrics module on its own: off costs nothing, on it counts what it is told in Prometheus
text, two sidecars' metrics in one process stay apart, and OTLP pushes reach a collector.

The sidecar wiring (real tasks on real OpenCode, /metrics and /readyz over HTTP) is in
``tests/integration/test_observability_http.py``.
"""

from __future__ import annotations

import datetime
import gzip

import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from ocbridge.bridge.config import load_config
from ocbridge.bridge.engines.base import AgentEvent
from ocbridge.bridge.engines.scripted import ScriptedEngine
from ocbridge.bridge.observability.metrics import (
    METRIC_NAMES,
    NO_METRICS,
    OTelMetrics,
    build_metrics,
    metrics_exporters,
)
from ocbridge.client.protocol import TaskResult


def samples(metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``(sample name, sorted labels) -> value`` of the Prometheus text."""
    body, content_type = metrics.prometheus_text()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def result(status: str, *, prompt=0, completion=0, cost=None, error_type=None, duration=1500) -> TaskResult:
    return TaskResult.model_validate({
        "taskID": "t", "status": status, "errorType": error_type,
        "metrics": {"duration": duration, "promptTokens": prompt, "completionTokens": completion, "cost": cost},
    })


def test_off_unless_a_port_or_an_exporter_is_configured():
    config = load_config(environ={})
    assert build_metrics(config, instance="x", environ={}) is NO_METRICS
    assert build_metrics(config, instance="x", environ={"OTEL_METRICS_EXPORTER": "none"}) is NO_METRICS
    assert NO_METRICS.prometheus_text() is None

    async def sink(event: AgentEvent) -> None:
        pass

    assert NO_METRICS.first_event(sink) is sink  # nothing wraps the agent's events when off
    assert metrics_exporters({"OTEL_METRICS_EXPORTER": "otlp, console,prometheus,none"}) == {"otlp", "console"}
    on = build_metrics(load_config(overrides={"observability": {"http_port": 0}}, environ={}), instance="x",
                       environ={})
    assert on.enabled and on.prometheus_text() is not None


async def test_counts_what_it_is_told_in_prometheus_names():
    metrics = OTelMetrics(instance="sidecar-1")
    try:
        metrics.watch(engine=lambda: ScriptedEngine(), running=lambda: 1, slots=3)
        metrics.received(1)
        metrics.received(2)  # a redelivery
        metrics.finished(result("completed", prompt=100, completion=20, cost=0.25))
        metrics.finished(result("completed", prompt=50, completion=5))
        metrics.finished(result("error", error_type="provider_error", prompt=7, completion=1))
        metrics.finished(result("error", error_type="made_up_by_an_engine"))
        metrics.finished(result("cancelled"))
        metrics.finished(result("timeout", duration=60_000))
        metrics.gave_back()
        metrics.dead_lettered()
        metrics.queue_wait(datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=2))
        events = []

        async def sink(event: AgentEvent) -> None:
            events.append(event)

        timed = metrics.first_event(sink)
        await timed(AgentEvent("text", "a"))
        await timed(AgentEvent("text", "b"))
        assert [e.content for e in events] == ["a", "b"]

        seen = samples(metrics)
        expected = {
            "ocbridge_tasks_received_total": 2, "ocbridge_redeliveries_total": 1,
            "ocbridge_tasks_completed_total": 2, "ocbridge_tasks_cancelled_total": 1,
            "ocbridge_tasks_timed_out_total": 1, "ocbridge_tasks_retried_total": 1,
            "ocbridge_dead_letters_total": 1, "ocbridge_cost_usd_total": 0.25,
            "ocbridge_tasks_active": 1, "ocbridge_slots_free": 2,
            "ocbridge_queue_wait_seconds_count": 1,
        }
        assert {name: seen[(name, ())] for name in expected} == expected
        assert seen[("ocbridge_tasks_failed_total", (("error_type", "provider_error"),))] == 1
        assert seen[("ocbridge_tasks_failed_total", (("error_type", "other"),))] == 1  # bounded label values
        assert seen[("ocbridge_tokens_total", (("type", "input"),))] == 157
        assert seen[("ocbridge_tokens_total", (("type", "output"),))] == 26
        assert seen[("ocbridge_task_duration_seconds_count", (("engine", "scripted"), ("status", "completed")))] == 2
        assert seen[("ocbridge_task_duration_seconds_sum", (("engine", "scripted"), ("status", "timeout")))] == 60
        assert seen[("ocbridge_queue_wait_seconds_sum", ())] >= 2
        assert seen[("ocbridge_time_to_first_event_seconds_count", (("engine", "scripted"),))] == 1  # the first only
        # No managed OpenCode behind a scripted engine: no restarts or RSS series rather than zeros.
        assert not any(name.startswith("ocbridge_opencode") for name, _ in seen)
        # Every name the README lists exists (histograms and counters by their family name).
        families = {name.removesuffix("_count") for name, _ in seen if not name.endswith(("_sum", "_bucket"))}
        assert set(METRIC_NAMES) - families == {"ocbridge_opencode_restarts_total", "ocbridge_opencode_rss_bytes"}
    finally:
        await metrics.aclose()


async def test_two_sidecars_in_one_process_keep_their_own_numbers():
    first, second = OTelMetrics(instance="a"), OTelMetrics(instance="b")
    try:
        first.finished(result("completed", prompt=3))
        for _ in range(2):
            second.finished(result("completed", prompt=5))
        assert samples(first)[("ocbridge_tasks_completed_total", ())] == 1
        assert samples(second)[("ocbridge_tasks_completed_total", ())] == 2
        assert samples(second)[("ocbridge_tokens_total", (("type", "input"),))] == 10
    finally:
        await first.aclose()
        await second.aclose()
    again = OTelMetrics(instance="a")  # a stopped sidecar's registry is gone: a new one starts at 0
    try:
        assert samples(again)[("ocbridge_tasks_completed_total", ())] == 0
    finally:
        await again.aclose()


@pytest.fixture
async def collector(aiohttp_server):
    """A stand-in OTLP/HTTP collector (no real collector binary here): decodes what it is sent."""
    received: list[ExportMetricsServiceRequest] = []

    async def export(request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        received.append(ExportMetricsServiceRequest.FromString(body))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/metrics", export)
    server = await aiohttp_server(app)
    return server, received


async def test_otlp_exporter_pushes_the_same_instruments(collector, monkeypatch):
    server, received = collector
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"http://127.0.0.1:{server.port}/v1/metrics")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ocbridge-test")
    metrics = build_metrics(load_config(environ={}), instance="pushing")  # no port: OTLP only
    assert metrics.enabled and metrics.prometheus_text() is None
    metrics.finished(result("completed", prompt=11, completion=4))
    await metrics.aclose()  # the last collection is pushed on shutdown

    points: dict[str, float] = {}
    resource: dict[str, str] = {}
    for request in received:
        for rm in request.resource_metrics:
            resource.update({a.key: a.value.string_value for a in rm.resource.attributes})
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.HasField("sum"):
                        for point in metric.sum.data_points:
                            labels = ",".join(f"{a.key}={a.value.string_value}" for a in point.attributes)
                            points[f"{metric.name}{{{labels}}}"] = point.as_int or point.as_double
    assert points["ocbridge.tasks.completed{}"] == 1
    assert points["ocbridge.tokens{type=input}"] == 11
    assert resource["service.name"] == "ocbridge-test" and resource["service.instance.id"] == "pushing"
