"""Tracing set-up from ``OTEL_*``, the no-op path when off, and the spans of one in-process task
(ScriptedEngine; the NATS hop and real OpenCode are in tests/integration/test_tracing.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import INVALID_SPAN, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ocbridge.bridge.config import load_config
from ocbridge.bridge.engines.scripted import Fail, ScriptedEngine, Tool, Usage, WriteFile
from ocbridge.bridge.inprocess.runner import LocalRunner
from ocbridge.bridge.observability import tracing
from ocbridge.bridge.redact import Redactor
from ocbridge.client import tracing as client_tracing
from ocbridge.client.protocol import StreamEvent, Task

SECRET = "glpat-averysecretvalue123456"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = tracing.install_memory()
    yield exporter
    tracing.install(None)


@pytest.fixture
def config(tmp_path):
    return load_config(overrides={"workspace_root": str(tmp_path / "ws"), "data_dir": str(tmp_path / "data")},
                       environ={})


def make_task(task_id: str = "t1") -> Task:
    return Task.model_validate({
        "taskID": task_id, "session": {"name": f"s-{task_id}"}, "workspace": {"name": f"w-{task_id}"},
        "prompt": "write it", "model": {"providerID": "anthropic", "modelID": "claude-x"},
        "callback": {"streamSubject": f"stream.{task_id}", "resultSubject": f"result.{task_id}"},
    })


# ------------------------------------------------------------------------------------ set-up


@pytest.mark.parametrize("environ", [
    {}, {"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_TRACES_EXPORTER": "nonsense"},
    {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"},
], ids=["unset", "none", "unknown", "sdk-disabled"])
def test_tracing_is_off_unless_an_exporter_is_named(environ):
    assert tracing.configure(environ=environ) is False
    assert not tracing.enabled()
    assert tracing.span("anything") is tracing.span("else")  # one shared no-op context
    with tracing.span("x") as span:
        assert not span.is_recording() and tracing.trace_headers() is None


def test_a_configured_provider_is_shared_and_the_last_user_stops_it():
    environ = {"OTEL_TRACES_EXPORTER": "memory"}
    assert tracing.configure(environ=environ) and tracing.configure(environ=environ)  # two sidecars
    tracing.shutdown()
    assert tracing.enabled()
    tracing.shutdown()
    assert not tracing.enabled()


def test_configure_keeps_a_provider_installed_by_the_application(spans):
    assert tracing.configure(environ={"OTEL_TRACES_EXPORTER": "console"})
    tracing.shutdown()  # not ours to stop
    with tracing.span("still-mine"):
        pass
    assert [s.name for s in spans.get_finished_spans()] == ["still-mine"]


def test_a_failing_step_marks_its_span_with_a_redacted_message():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider, redactor=Redactor([SECRET]))
    try:
        with pytest.raises(RuntimeError), tracing.span("git.fetch"):
            raise RuntimeError(f"auth failed for {SECRET}")
    finally:
        tracing.install(None)
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR and "auth failed" in span.status.description
    text = repr(span.to_json())
    assert SECRET not in text and "***" in text


def test_off_a_callers_context_is_still_current_for_the_logs():
    caller = TracerProvider().get_tracer("caller").start_span("station.agent.execute")
    headers: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(headers, context=set_span_in_context(caller))
    with tracing.task_span("t1", engine="opencode", parent=tracing.extract(headers)) as span:
        assert not span.is_recording()
        assert span.get_span_context().trace_id == caller.get_span_context().trace_id
        assert tracing.trace_headers() is None  # nothing of ours to send back
    with tracing.task_span("t2", engine="opencode", parent=tracing.extract({})) as span:
        assert span is INVALID_SPAN


# ---------------------------------------------------------------------------- one task's spans


async def test_an_in_process_task_is_one_span_tree_with_stations_attributes(spans, config):
    engine = ScriptedEngine([
        Tool("write", args={"filePath": "a.txt"}, output="ok", duration=5), WriteFile("a.txt", "a\n"),
        "done", Usage(prompt_tokens=10, completion_tokens=4, cost=0.5),
    ])
    events: list[StreamEvent] = []

    async def collect(event: StreamEvent) -> None:
        events.append(event)

    async with LocalRunner(config, engine=engine, redactor=Redactor()) as runner:
        result = await runner.run(make_task(), collect)
    assert result.status == "completed"
    finished = spans.get_finished_spans()
    task_span = next(s for s in finished if s.name == "opencode.task")
    assert task_span.parent is None
    below = sorted(s.name for s in finished if s.parent is not None and s.parent.span_id == task_span.context.span_id)
    assert below == sorted(["session.lease", "workspace.prepare", "session.resolve", "opencode.prompt",
                            "opencode.tool.write", "workspace.changes"])
    assert {s.context.trace_id for s in finished} == {task_span.context.trace_id}
    attributes = dict(task_span.attributes)
    assert attributes["opencode.model"] == "claude-x" and attributes["opencode.provider"] == "anthropic"
    assert attributes["opencode.tokens.input"] == 10 and attributes["opencode.tokens.output"] == 4
    assert attributes["opencode.cost"] == 0.5 and attributes["opencode.tool_calls"] == 1
    assert attributes["opencode.status"] == "completed" and attributes["opencode.attempt"] == 1
    assert attributes["opencode.workspace"] == result.workspace.path
    tool = next(s for s in finished if s.name == "opencode.tool.write")
    assert tool.end_time - tool.start_time >= 5_000_000  # the reported duration at least


async def test_a_failed_task_marks_its_span_failed(spans, config):
    async with LocalRunner(config, engine=ScriptedEngine([Fail("provider said no", "provider_error")]),
                           redactor=Redactor()) as runner:
        result = await runner.run(make_task("t-fail"))
    assert result.status == "error"
    task_span = next(s for s in spans.get_finished_spans() if s.name == "opencode.task")
    assert task_span.status.status_code == StatusCode.ERROR and task_span.status.description == "provider_error"
    assert task_span.attributes["opencode.error_type"] == "provider_error"


def test_tool_spans_use_the_agents_times_and_close_unfinished_ones(spans):
    with tracing.task_span("t1", engine="claudecode") as task_span:
        tools = tracing.ToolSpans.for_current_task()
        assert tools is not None
        tools.start("c1", "Write", 1_700_000_000.25)
        tools.end("c1", "Write", started_at=1_700_000_000.25, ended_at=1_700_000_001.5)
        tools.start("c2", "Bash", 1_700_000_002.0)
        tools.close()  # the run was aborted while Bash ran
    by_id = {s.attributes["tool.call_id"]: s for s in spans.get_finished_spans() if ".tool." in s.name}
    write, bash = by_id["c1"], by_id["c2"]
    assert write.name == "claudecode.tool.Write" and write.parent.span_id == task_span.get_span_context().span_id
    assert abs(write.start_time - 1_700_000_000_250_000_000) < 1_000
    assert abs(write.end_time - 1_700_000_001_500_000_000) < 1_000
    assert bash.attributes["tool.finished"] is False and bash.status.status_code == StatusCode.ERROR


# ------------------------------------------------------------------------------- the client


def test_the_client_works_without_opentelemetry():
    script = textwrap.dedent("""
        import asyncio, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from ocbridge.client import CodingClient, tracing
        assert not tracing.available()
        with tracing.send_span("client.submit", {}) as headers:
            assert headers == {}
        with tracing.result_span("t", {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}, None) as span:
            assert span is None
        assert tracing.trace_id_of({"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}) == "a" * 32
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_client_without_a_tracer_provider_sends_no_headers():
    with client_tracing.send_span("client.submit", {"ocbridge.task_id": "t"}) as headers:
        assert headers == {}
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client_tracing.set_tracer_provider(provider)
    try:
        with client_tracing.send_span("client.submit", {"ocbridge.task_id": "t"}) as headers:
            assert set(headers) == {"traceparent"}
    finally:
        client_tracing.set_tracer_provider(None)
    (span,) = exporter.get_finished_spans()
    assert client_tracing.trace_id_of(headers) == f"{span.context.trace_id:032x}"
