"""Structured logs: task fields on every record, JSON or text, trace ids, always redacted."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from ocbridge.bridge.logs import bind_log_fields, log_fields, setup_logging
from ocbridge.bridge.redact import MASK, Redactor

SECRET = "ghp_S3cretTokenValue0123456789abcdefXYZ"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def logs() -> Iterator[tuple[io.StringIO, Redactor]]:
    """Logging set up as ``ocbridge serve`` does, into a pipe-like (non-TTY) stream; restored after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream, redactor = io.StringIO(), Redactor([SECRET])
    setup_logging(redactor, "INFO", "auto", stream=stream)
    yield stream, redactor
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def records(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_records_inside_a_task_carry_its_fields_as_json_and_others_do_not(logs):
    stream, _ = logs
    log = logging.getLogger("ocbridge.test")
    with log_fields(task_id="t-1", session="review", workspace="repo-a", attempt=2):
        log.info("working on %s", "it")
    log.info("idle")
    inside, outside = records(stream)
    assert inside["message"] == "working on it" and inside["level"] == "INFO" and inside["logger"] == "ocbridge.test"
    assert (inside["task_id"], inside["session"], inside["workspace"], inside["attempt"]) == (
        "t-1", "review", "repo-a", 2)
    assert "trace_id" not in inside
    assert outside["message"] == "idle" and not {"task_id", "session", "workspace", "attempt"} & outside.keys()


async def test_fields_follow_the_task_into_the_tasks_it_starts_and_stay_there(logs):
    stream, _ = logs
    log = logging.getLogger("ocbridge.test")

    async def one(task_id: str, attempt: int) -> None:
        with log_fields(task_id=task_id):
            bind_log_fields(attempt=attempt)  # learnt part-way, as the worker does
            await asyncio.sleep(0)  # interleave the two tasks
            await asyncio.create_task(_log_later(log, f"step of {task_id}"))

    await asyncio.gather(asyncio.create_task(one("a", 1)), asyncio.create_task(one("b", 3)))
    logged = {r["message"]: (r["task_id"], r["attempt"]) for r in records(stream)}
    assert logged == {"step of a": ("a", 1), "step of b": ("b", 3)}


async def _log_later(log: logging.Logger, message: str) -> None:
    await asyncio.sleep(0)
    log.info(message)


def test_the_current_trace_and_span_ids_are_fields(logs):
    stream, _ = logs
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span, log_fields(task_id="t-2"):
        logging.getLogger("ocbridge.test").warning("inside a span")
    record = records(stream)[0]
    context = span.get_span_context()
    assert record["trace_id"] == f"{context.trace_id:032x}" and record["span_id"] == f"{context.span_id:016x}"
    assert record["task_id"] == "t-2" and record["level"] == "WARNING"


def test_a_terminal_gets_readable_text_with_the_fields_appended():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = Terminal()
    setup_logging(Redactor(), "INFO", "auto", stream=stream)
    try:
        with log_fields(task_id="t-3", workspace="my repo", attempt=1):
            logging.getLogger("ocbridge.test").info("ready")
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    line = stream.getvalue().strip()
    assert not line.startswith("{")
    assert "INFO" in line and "ocbridge.test: ready" in line
    assert line.endswith('[task_id=t-3 workspace="my repo" attempt=1]')


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_explicit_formats_win_over_the_terminal_check(fmt):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = Terminal()
    setup_logging(Redactor(), "INFO", fmt, stream=stream)
    try:
        logging.getLogger("ocbridge.test").info("hello")
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    assert stream.getvalue().startswith("{") == (fmt == "json")


def test_a_secret_in_a_field_in_the_message_or_in_a_traceback_is_masked(logs):
    stream, _ = logs
    log = logging.getLogger("ocbridge.test")
    with log_fields(task_id="t-4", session=f"s-{SECRET}", workspace="w"):
        log.info("cloning with %s", SECRET)
        log.info("extra field", extra={"workspace": f"ws-{SECRET}"})
        try:
            raise RuntimeError(f"git said {SECRET}")
        except RuntimeError:
            log.exception("clone failed")
    text = stream.getvalue()
    assert SECRET not in text
    first, second, third = records(stream)
    assert first["message"] == f"cloning with {MASK}" and first["session"] == f"s-{MASK}"
    assert second["workspace"] == f"ws-{MASK}"
    assert third["message"] == "clone failed" and MASK in third["exception"]
