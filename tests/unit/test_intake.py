"""What a delivered message is (a task, an error result to send, or a dead letter), and the
message-size rules: pure functions, fuzzed with Hypothesis."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocbridge.bridge.jetstream.intake import Rejection, read_task
from ocbridge.client.protocol import Naming, Task, callback_problem, spill

NAMING = Naming()
LIMIT = 64 * 1024


def task_body(task_id: str = "t1", **fields) -> dict:
    body = {
        "taskID": task_id,
        "session": {"name": "s"},
        "workspace": {"name": "ws"},
        "prompt": "do it",
        "callback": {"streamSubject": f"station.coding.stream.{task_id}",
                     "resultSubject": f"station.coding.result.{task_id}"},
    }
    body.update(fields)
    return body


def test_a_good_task_is_a_task():
    task = read_task(json.dumps(task_body()).encode(), naming=NAMING, max_bytes=LIMIT)
    assert isinstance(task, Task) and task.task_id == "t1"


@pytest.mark.parametrize("subject, why", [
    ("station.coding.result.t2", "not this task's own subject"),
    ("station.coding.result.*", "not one concrete subject"),
    ("station.coding.result.>", "not one concrete subject"),
    ("station.coding.result..t1", "not one concrete subject"),
    ("station.coding.result. t1", "not one concrete subject"),
    ("$JS.API.STREAM.DELETE.OCBRIDGE_TASKS", "reserved"),
    ("$KV.opencode-sessions.victim", "reserved"),
    ("_INBOX.x", "reserved"),
    ("station.coding.task", "the sidecar's own subject"),
    ("station.coding.task.cancel.t9", "the sidecar's own subject"),
    ("station.coding.task.ops", "the sidecar's own subject"),
    ("station.coding.task.deadletter", "the sidecar's own subject"),
])
def test_callbacks_a_task_may_not_name(subject, why):
    assert why in callback_problem(subject, prefix="station.coding.result", task_id="t1", naming=NAMING)
    body = task_body()
    body["callback"]["resultSubject"] = subject
    rejection = read_task(json.dumps(body).encode(), naming=NAMING, max_bytes=LIMIT)
    # Dead-lettered: nothing is ever published to a subject the task may not name.
    assert isinstance(rejection, Rejection) and rejection.result_subject is None
    assert "unacceptable callback" in rejection.reason or "invalid task" in rejection.reason


def test_the_prefix_and_any_scopes_are_looser_but_never_reach_reserved_subjects():
    prefix = NAMING.model_copy(update={"callbacks": "prefix"})
    anything = NAMING.model_copy(update={"callbacks": "any"})
    own = "station.coding.result"
    assert callback_problem("station.coding.result.other", prefix=own, task_id="t1", naming=prefix) is None
    assert callback_problem("elsewhere.t1", prefix=own, task_id="t1", naming=prefix) is not None
    assert callback_problem("elsewhere.t1", prefix=own, task_id="t1", naming=anything) is None
    for scope in (prefix, anything):
        assert callback_problem("$JS.API.INFO", prefix=own, task_id="t1", naming=scope) is not None
        assert callback_problem("station.coding.task.cancel.x", prefix=own, task_id="t1", naming=scope) is not None


def test_an_invalid_task_with_its_own_result_subject_is_answered_there():
    body = task_body()
    del body["prompt"]
    rejection = read_task(json.dumps(body).encode(), naming=NAMING, max_bytes=LIMIT)
    assert rejection == Rejection(rejection.reason, "t1", "station.coding.result.t1")
    assert "prompt" in rejection.reason


def test_a_task_id_missing_is_taken_from_the_result_subject():
    body = task_body()
    del body["taskID"]
    rejection = read_task(json.dumps(body).encode(), naming=NAMING, max_bytes=LIMIT)
    assert (rejection.task_id, rejection.result_subject) == ("t1", "station.coding.result.t1")


def test_a_big_task_is_answered_with_the_limit():
    body = task_body(prompt="x" * 5000)
    rejection = read_task(json.dumps(body).encode(), naming=NAMING, max_bytes=4096)
    assert rejection.result_subject == "station.coding.result.t1" and "exceeds the limit of 4096" in rejection.reason


@pytest.mark.parametrize("data, why", [
    (b"\xc3\x28", "not UTF-8"),
    (b'{"taskID": "\\ud800"}', "not valid Unicode"),
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    (b'{"a":' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper"),
    (b"null", "must be a JSON object"),
    (b"{", "not JSON"),
])
def test_unreadable_bodies_are_dead_lettered(data, why):
    rejection = read_task(data, naming=NAMING, max_bytes=1 << 20)
    assert isinstance(rejection, Rejection) and rejection.result_subject is None and why in rejection.reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(
            st.sampled_from(["taskID", "session", "workspace", "prompt", "callback", "timeout", "model", "files"]),
            json_values, max_size=8,
        ).map(lambda d: json.dumps(d).encode()),
        st.builds(
            lambda task_id, subject, own, name, prompt: json.dumps(task_body(
                task_id, prompt=prompt, workspace={"name": name},
                callback={
                    "streamSubject": f"station.coding.stream.{task_id}" if own else subject,
                    "resultSubject": f"station.coding.result.{task_id}" if own else subject,
                },
            )).encode(),
            st.text(max_size=30), st.text(max_size=40), st.booleans(), st.text(max_size=30), st.text(max_size=40),
        ),
    )
)
def test_any_body_is_a_task_with_its_own_subjects_or_a_rejection_that_never_names_another_subject(body):
    outcome = read_task(body, naming=NAMING, max_bytes=LIMIT)
    if isinstance(outcome, Task):
        own = (f"station.coding.stream.{outcome.task_id}", f"station.coding.result.{outcome.task_id}")
        assert (outcome.callback.stream_subject, outcome.callback.result_subject) == own
    else:
        assert isinstance(outcome, Rejection) and outcome.reason
        if outcome.result_subject is not None:
            assert outcome.result_subject == f"station.coding.result.{outcome.task_id}"


@settings(max_examples=100, deadline=None)
@given(
    changes=st.lists(st.text(min_size=1, max_size=200), max_size=400),
    text=st.text(max_size=20_000),
    limit=st.integers(min_value=8 * 1024, max_value=64 * 1024),
)
def test_a_spilled_message_fits_and_restores_exactly(changes, text, limit):
    payload = {"taskID": "t", "status": "completed", "result": text, "changes": [{"path": p} for p in changes]}
    message, objects = spill.spill(payload, limit=limit, object_name=lambda field: f"output/t/result.{field}.json")
    assert len(spill.encode(message)) <= limit
    assert spill.restore(message, objects) == payload
    assert set(message.get("spilled", {}).values()) == set(objects)


def test_a_message_that_cannot_fit_is_an_error():
    with pytest.raises(spill.SpillError):
        spill.spill({"taskID": "t" * 10_000}, limit=8192, object_name=str)


def test_a_missing_spilled_object_stays_listed():
    message = {"taskID": "t", "spilled": {"changes": "output/t/result.changes.json"}}
    assert spill.restore(message, {}) == message


def test_a_too_deep_task_with_its_own_callback_is_answered():
    body = task_body()
    body["extra"] = json.loads("[" * 40 + "]" * 40)
    rejection = read_task(json.dumps(body).encode(), naming=NAMING, max_bytes=LIMIT)
    assert rejection.result_subject == "station.coding.result.t1" and "nested deeper" in rejection.reason
