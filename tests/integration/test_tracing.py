"""Traces across the NATS hop: ``client.submit`` -> ``opencode.task`` -> its steps and tool calls,
with an in-memory exporter on both sides (client and sidecar in this process, real nats-server,
real git), plus the OTLP exporters against local collectors.

The sidecar's tracer comes from :func:`tracing.install_memory`, the client's from
:func:`ocbridge.client.tracing.set_tracer_provider`: neither touches OpenTelemetry's global provider.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent import futures

import grpc
import nats
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from ocbridge.bridge import Sidecar
from ocbridge.bridge.engines.scripted import ScriptedEngine, Tool, Usage, WriteFile
from ocbridge.bridge.observability import tracing
from ocbridge.client import CodingClient
from ocbridge.client import tracing as client_tracing
from ocbridge.client.protocol import StreamEvent, TaskResult
from support.gitserver import make_remote
from support.stack import sidecar_config, unique_naming


@pytest.fixture
def sidecar_spans() -> Iterator[InMemorySpanExporter]:
    exporter = tracing.install_memory()
    yield exporter
    tracing.install(None)


@pytest.fixture
def client_spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client_tracing.set_tracer_provider(provider)
    yield exporter
    client_tracing.set_tracer_provider(None)


@pytest.fixture
async def scripted(nats_server, tmp_path) -> AsyncIterator[tuple[Sidecar, CodingClient]]:
    """A sidecar on ScriptedEngine (one write tool call) that may clone local repositories."""
    engine = ScriptedEngine([
        "Writing the file. ",
        Tool("write", args={"filePath": "hello.txt"}, output="Wrote file", duration=3),
        WriteFile("hello.txt", "hi\n"),
        "Done.",
        Usage(prompt_tokens=120, completion_tokens=30, cost=0.002),
    ])
    naming = unique_naming()
    config = sidecar_config(nats_server.url, tmp_path, naming,
                            git={"allow_file_urls": True, "user_name": "Bridge Bot", "user_email": "bot@example.com"})
    sidecar = Sidecar(config, engine=engine)
    await sidecar.start()
    client = await CodingClient.connect(nats_server.url, naming=naming)
    try:
        yield sidecar, client
    finally:
        await client.close()
        await sidecar.stop(grace=2)


def by_name(spans: tuple[ReadableSpan, ...] | list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {[s.name for s in spans]}"
    return found[0]


def children(spans, parent: ReadableSpan) -> list[str]:
    return sorted(s.name for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id)


async def until(condition, timeout: float = 30.0) -> None:
    """Wait for what another subscription or task finishes (a span ends after the result is sent)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


def finished(exporter: InMemorySpanExporter, name: str):
    return lambda: any(s.name == name for s in exporter.get_finished_spans())


async def capture(nc: nats.NATS, subject: str) -> list:
    """Raw messages (headers included) published on ``subject`` from now on."""
    seen: list = []

    async def keep(msg) -> None:
        seen.append(msg)

    await nc.subscribe(subject, cb=keep)
    return seen


async def test_one_trace_from_client_submit_through_the_sidecar_to_the_tool_spans(
    scripted, sidecar_spans, client_spans, tmp_path
):
    client = scripted[1]
    remote = make_remote(tmp_path / "remote")
    task = client.build_task("create hello.txt", workspace=f"ws-{uuid.uuid4().hex[:6]}", session="traced",
                             git={"url": f"file://{remote.bare}"})
    events_on_wire = await capture(client.nc, task.callback.stream_subject)
    results_on_wire = await capture(client.nc, task.callback.result_subject)
    handle = await client.submit(task)
    events = [event async for event in handle.events(timeout=60)]
    result = await handle.result(timeout=60)
    assert result.status == "completed" and [e.type for e in events].count("tool_end") == 1

    await until(finished(sidecar_spans, "opencode.task"))  # it ends once the message is acked
    submit = by_name(client_spans.get_finished_spans(), "client.submit")
    received = by_name(client_spans.get_finished_spans(), "client.result")
    spans = sidecar_spans.get_finished_spans()
    task_span = by_name(spans, "opencode.task")
    trace_id = submit.context.trace_id

    # One trace, and the parent link crosses the NATS hop both ways.
    assert submit.kind == SpanKind.PRODUCER and task_span.kind == SpanKind.CONSUMER
    assert task_span.parent is not None and task_span.parent.is_remote
    assert (task_span.parent.trace_id, task_span.parent.span_id) == (trace_id, submit.context.span_id)
    assert {s.context.trace_id for s in spans} == {trace_id}
    assert received.parent.span_id == task_span.context.span_id and received.context.trace_id == trace_id
    assert handle.trace_id == f"{trace_id:032x}"
    assert handle.traceparent.split("-")[1:3] == [f"{trace_id:032x}", f"{task_span.context.span_id:016x}"]

    # The steps of the task, and one span per tool call, children of the task span.
    assert children(spans, task_span) == sorted([
        "session.lease", "workspace.prepare", "session.resolve", "opencode.prompt", "workspace.changes",
        "opencode.tool.write",
    ])
    prepare = by_name(spans, "workspace.prepare")
    git_steps = children(spans, prepare)
    assert "git.clone" in git_steps, git_steps
    assert by_name(spans, "git.clone").attributes["git.exit_code"] == 0
    tool = by_name(spans, "opencode.tool.write")
    assert tool.attributes["tool.name"] == "write" and tool.attributes["tool.finished"] is True
    assert tool.start_time <= tool.end_time

    # Station's attribute names, from the result.
    attributes = task_span.attributes
    assert attributes["opencode.task_id"] == task.task_id and attributes["opencode.status"] == "completed"
    assert attributes["opencode.attempt"] == 1 and attributes["opencode.tool_calls"] == 1
    assert (attributes["opencode.tokens.input"], attributes["opencode.tokens.output"]) == (120, 30)
    assert attributes["opencode.cost"] == pytest.approx(0.002)
    assert attributes["opencode.session_id"] == result.session.opencode_id
    assert attributes["opencode.workspace"] == result.workspace.path
    assert task_span.status.status_code != StatusCode.ERROR

    # Every event and the result carry the task span's context in their NATS headers (the JSON is unchanged).
    await until(lambda: len(events_on_wire) == result.metrics.stream_events and results_on_wire)
    assert len(results_on_wire) == 1
    for msg in [*events_on_wire, *results_on_wire]:
        assert msg.headers["traceparent"] == handle.traceparent
    assert "traceparent" not in json.loads(results_on_wire[0].data)


async def test_a_task_published_without_headers_starts_a_new_trace(scripted, sidecar_spans, client_spans):
    client = scripted[1]
    task = client.build_task("create hello.txt", workspace="ws-station", session="station")
    results_on_wire = await capture(client.nc, task.callback.result_subject)
    # What Station does: a plain core-NATS publish of the JSON, no headers.
    await client.nc.publish(client.naming.task_subject, task.to_wire())
    await client.nc.flush()
    await until(lambda: results_on_wire, 60)
    assert TaskResult.from_wire(results_on_wire[0].data).status == "completed"

    assert client_spans.get_finished_spans() == ()  # the client sent nothing
    await until(finished(sidecar_spans, "opencode.task"))
    task_span = by_name(sidecar_spans.get_finished_spans(), "opencode.task")
    assert task_span.parent is None
    trace_id = f"{task_span.context.trace_id:032x}"
    assert results_on_wire[0].headers["traceparent"].split("-")[1] == trace_id
    assert client_tracing.trace_id_of(results_on_wire[0].headers) == trace_id


async def test_without_tracing_nothing_is_recorded_and_no_header_is_sent(scripted):
    client = scripted[1]
    assert not tracing.enabled()
    task = client.build_task("create hello.txt", workspace="ws-off", session="off")
    events_on_wire = await capture(client.nc, task.callback.stream_subject)
    handle = await client.submit(task)
    result = await handle.result(timeout=60)
    assert result.status == "completed"
    await until(lambda: len(events_on_wire) == result.metrics.stream_events)
    assert all(not msg.headers for msg in events_on_wire)
    assert handle.trace_id is None and handle.traceparent is None


async def test_a_workspace_operation_is_a_span_under_the_clients(scripted, sidecar_spans, client_spans):
    client = scripted[1]
    opened = await client.op({"op": "open", "session": "ops-traced", "workspace": "ws-ops"})
    closed = await client.op({"op": "close", "session": "ops-traced"})
    assert opened.ok and closed.ok

    sent = [s for s in client_spans.get_finished_spans() if s.name == "client.op"]
    ops = {s.name: s for s in sidecar_spans.get_finished_spans() if s.name.startswith("workspace.")}
    assert set(ops) == {"workspace.open", "workspace.close"} and len(sent) == 2
    for span, request in zip((ops["workspace.open"], ops["workspace.close"]), sent, strict=True):
        assert span.parent.span_id == request.context.span_id and span.attributes["workspace.ok"] is True


# ----------------------------------------------------------------------------- real OpenCode


@pytest.mark.opencode
@pytest.mark.slow
async def test_real_opencode_tool_calls_are_spans_with_their_own_start_and_end(stack, sidecar_spans, client_spans):
    client = stack[1]
    handle = await client.submit("create traced.txt with content hi", workspace="ws-traced-oc", session="oc-traced")
    events: list[StreamEvent] = [event async for event in handle.events(timeout=120)]
    result = await handle.result(timeout=120)
    assert result.status == "completed"
    ends = {e.tool.call_id: e.tool for e in events if e.type == "tool_end"}
    assert ends, [e.type for e in events]

    await until(finished(sidecar_spans, "opencode.task"))
    spans = sidecar_spans.get_finished_spans()
    task_span = by_name(spans, "opencode.task")
    submit = by_name(client_spans.get_finished_spans(), "client.submit")
    assert task_span.parent.span_id == submit.context.span_id
    assert task_span.attributes["opencode.session_id"] == result.session.opencode_id
    assert task_span.attributes["opencode.tokens.input"] == result.metrics.prompt_tokens > 0
    prompt = by_name(spans, "opencode.prompt")
    tools = [s for s in spans if s.name.startswith("opencode.tool.")]
    assert sorted(s.attributes["tool.call_id"] for s in tools) == sorted(ends)
    for tool in tools:
        info = ends[tool.attributes["tool.call_id"]]
        assert tool.name == f"opencode.tool.{info.name}" and tool.parent.span_id == task_span.context.span_id
        assert tool.context.trace_id == submit.context.trace_id
        # OpenCode's own start and end: the span lasts what the tool_end event reports, and lies
        # inside the prompt.
        assert round((tool.end_time - tool.start_time) / 1e6) == info.duration
        for stamp in (tool.start_time, tool.end_time):  # OpenCode's own milliseconds, not receipt times
            assert min(stamp % 1_000_000, -stamp % 1_000_000) < 1_000
        assert prompt.start_time <= tool.start_time < tool.end_time <= prompt.end_time or info.duration == 0
    assert "opencode.tool.write" in {s.name for s in tools}


# ---------------------------------------------------------------------------------- exporters


async def test_otlp_over_http_from_the_environment_reaches_a_collector(nats_server, tmp_path, monkeypatch):
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def collect(request: web.Request) -> web.Response:
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    try:
        naming = unique_naming()
        sidecar = Sidecar(sidecar_config(nats_server.url, tmp_path, naming), engine=ScriptedEngine(["done"]))
        await sidecar.start()
        assert tracing.enabled()
        try:
            async with await CodingClient.connect(nats_server.url, naming=naming) as client:
                assert (await client.run("go", workspace="ws-otlp", wait=60)).status == "completed"
        finally:
            await sidecar.stop(grace=2)  # flushes the batch to the collector
        assert not tracing.enabled()
    finally:
        await runner.cleanup()
    spans = [(resource.resource, span) for message in received for resource in message.resource_spans
             for scope in resource.scope_spans for span in scope.spans]
    names = {span.name for _, span in spans}
    assert {"opencode.task", "opencode.prompt", "workspace.prepare"} <= names
    service = {a.key: a.value.string_value for a in spans[0][0].attributes}
    assert service["service.name"] == "ocbridge-sidecar" and service["service.instance.id"] == sidecar.id


def test_otlp_over_grpc_and_the_service_name_come_from_the_environment(monkeypatch):
    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def __init__(self) -> None:
            self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

        def Export(self, request, context):
            self.requests.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    for name, value in {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_SERVICE_NAME": "bridge-eu-1",
                        }.items():
        monkeypatch.setenv(name, value)
    try:
        assert tracing.configure()
        with tracing.span("workspace.commit") as span:
            assert span.is_recording()
        tracing.shutdown()
    finally:
        server.stop(grace=None)
    spans = [(r.resource, s) for m in collector.requests for r in m.resource_spans for sc in r.scope_spans
             for s in sc.spans]
    assert [s.name for _, s in spans] == ["workspace.commit"]
    assert {a.key: a.value.string_value for a in spans[0][0].attributes}["service.name"] == "bridge-eu-1"
