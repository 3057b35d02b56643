"""How a delivery ends: a give-back waits soon after a short outage, never hammering a store that
stays broken; a published result is recorded done even through a short outage of the store."""

from __future__ import annotations

import json
import time

from nats.js.errors import NoStreamResponseError

from ocbridge.bridge.jetstream import answers as answers_module
from ocbridge.bridge.jetstream.answers import FIRST_RETRY_DELAY, Answers, backoff
from ocbridge.bridge.observability.metrics import NO_METRICS
from ocbridge.bridge.redact import Redactor
from ocbridge.client.protocol import Task, TaskRecord, TaskResult, TaskStatus


def test_a_give_back_waits_half_a_second_then_doubles_up_to_the_retry_delay():
    delays = [backoff(delivered, cap=5.0) for delivered in range(1, 8)]
    assert delays == [FIRST_RETRY_DELAY, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert backoff(10_000, cap=5.0) == 5.0  # no overflow however often it was delivered
    assert backoff(1, cap=0.2) == 0.2  # a retry delay below the first step caps it too


# ----------------------------------------------------------------------- finishing through an outage
# Stand-ins for NATS: these tests are about the order and retries of Answers.finish, not NATS.


class RecordStore:
    """Task records whose writes fail while ``failing`` > 0 (one failure per write)."""

    def __init__(self, failing: int) -> None:
        self.failing = failing
        self.states: list[str] = []

    async def put(self, record: TaskRecord) -> None:
        if record.state == "done" and self.failing > 0:
            self.failing -= 1
            raise NoStreamResponseError
        self.states.append(record.state)


class Wire:
    """The NATS connection and the task message: what was published, and the ack."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.acked = 0

    async def publish(self, subject: str, payload: bytes, headers=None) -> None:
        self.published.append((subject, payload))

    async def flush(self, timeout: float) -> None:
        pass

    async def ack(self) -> None:
        self.acked += 1


class PlainPublisher:
    async def encode(self, payload: dict, *, object_prefix: str) -> bytes:
        return json.dumps(payload).encode()


def answers_for(store: RecordStore, wire: Wire) -> Answers:
    return Answers(nc=wire, records=store, publisher=PlainPublisher(), dead_letters=None, journal=None,
                   state_bucket=None, redactor=Redactor(), metrics=NO_METRICS, retry_delay=5.0,
                   note_error=lambda _: None)


def finished(task_id: str) -> tuple[Task, TaskResult, TaskRecord]:
    task = Task.model_validate({
        "taskID": task_id, "session": {"name": "s"}, "workspace": {"name": "w"}, "prompt": "write it",
        "callback": {"streamSubject": f"station.coding.stream.{task_id}",
                     "resultSubject": f"station.coding.result.{task_id}"},
    })
    result = TaskResult(taskID=task_id, status=TaskStatus.COMPLETED, result="done")
    return task, result, TaskRecord(taskID=task_id, state="running", attempt=1, streamSeq=7)


async def test_the_done_record_is_tried_again_through_a_short_outage(monkeypatch):
    monkeypatch.setattr(answers_module, "DONE_RETRY_FIRST_DELAY", 0.01)
    store, wire = RecordStore(failing=3), Wire()
    task, result, record = finished("t-outage")
    await answers_for(store, wire).finish(wire, task, result, record)
    assert store.states == ["publishing", "done"]  # recorded done once the store answered again
    assert [subject for subject, _ in wire.published] == ["station.coding.result.t-outage"]
    assert json.loads(wire.published[0][1])["status"] == "completed" and wire.acked == 1


async def test_a_store_that_stays_down_is_given_up_on_in_bounded_time(monkeypatch, caplog):
    monkeypatch.setattr(answers_module, "DONE_RETRY_FIRST_DELAY", 0.01)
    monkeypatch.setattr(answers_module, "DONE_RETRY_SECONDS", 0.2)
    store, wire = RecordStore(failing=10_000), Wire()
    task, result, record = finished("t-down")
    started = time.monotonic()
    await answers_for(store, wire).finish(wire, task, result, record)
    assert time.monotonic() - started < 2.0
    assert store.states == ["publishing"] and len(wire.published) == 1 and wire.acked == 1
    assert "t-down: recording it done failed (NoStreamResponseError" in caplog.text
