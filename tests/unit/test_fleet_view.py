"""The fleet view's models and its human rendering (``ocbridge status`` without ``--json``)."""

from __future__ import annotations

import pytest

from ocbridge.client.fleet import duration, render_fleet
from ocbridge.client.kv import json_object
from ocbridge.client.protocol import FleetSidecar, FleetStatus, QueueStatus, SidecarHeartbeat, WaitingTask


def beat(**fields) -> dict:
    base = {"id": "host-a-12-ab", "host": "host-a", "version": "0.1.0", "engine": "opencode", "concurrency": 2,
            "slotsUsed": 1, "slotsFree": 1, "runningTasks": ["t-1"], "started": "2026-01-01T00:00:00.000Z",
            "interval": 5, "ttl": 15}
    return {**base, **fields}


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (59.9, "59s"), (60, "1m"), (185, "3m05s"), (3600, "1h"), (7800, "2h10m"), (86400, "1d"),
    (7 * 86400 + 4 * 3600, "7d04h"),
])
def test_durations_read_like_an_operator_writes_them(seconds, text):
    assert duration(seconds) == text


def test_heartbeats_are_camel_case_on_the_wire_and_keep_unknown_fields():
    wire = beat(lastError="fetching tasks failed: timeout", newerField=1)
    parsed = SidecarHeartbeat.model_validate(wire)
    assert parsed.slots_used == 1 and parsed.running_tasks == ["t-1"] and parsed.last_error.startswith("fetching")
    out = parsed.to_dict()
    assert out["slotsFree"] == 1 and out["newerField"] == 1 and out["state"] == "running"
    assert "last_error" not in out and "lastErrorAt" not in out  # absent optional fields are left out


def test_the_human_view_shows_each_sidecar_the_queue_and_dead_letters():
    status = FleetStatus(
        sidecars=[
            FleetSidecar.model_validate({**beat(), "age": 3.2}),
            FleetSidecar.model_validate({**beat(id="host-b-7-cd", host="host-b", engineHealthy=False, state="stopping",
                                                slotsUsed=0, slotsFree=2, runningTasks=[],
                                                lastError="engine unhealthy: not taking tasks",
                                                lastErrorAt="2026-01-01T00:01:00.000Z"), "age": 61}),
        ],
        queue=QueueStatus(stream="OCBRIDGE_TASKS", consumer="ocbridge-workers", pending=4, ackPending=1, depth=5,
                          oldestWaiting=WaitingTask(taskID="t-9", seq=12, enqueued="2026-01-01T00:00:00.000Z",
                                                    age=185)),
        deadLetters={"stream": "OCBRIDGE_DEADLETTER", "messages": 2},
    )
    text = render_fleet(status)
    lines = text.splitlines()
    assert lines[0] == "SIDECARS (2)"
    header, first, second = lines[1:4]
    assert header.split() == ["ID", "HOST", "ENGINE", "VERSION", "USED/FREE", "RUNNING", "HEARTBEAT", "LAST", "ERROR"]
    assert first.split()[:7] == ["host-a-12-ab", "host-a", "opencode", "0.1.0", "1/1", "t-1", "3s"]
    assert "host-b-7-cd (stopping)" in second and "opencode (unhealthy)" in second and "1m01s ago" in second
    assert "engine unhealthy: not taking tasks" in second
    assert "depth 5: 4 waiting, 1 unacknowledged" in text
    assert "oldest waiting: 3m05s (task t-9, stream seq 12)" in text and "oldest unacknowledged: none" in text
    assert lines[-1] == "DEAD LETTERS  2 (stream OCBRIDGE_DEADLETTER)"


def test_an_empty_fleet_says_so_and_lists_what_is_missing():
    status = FleetStatus(queue=QueueStatus(problems=["no stream holds station.coding.task"]))
    text = render_fleet(status)
    assert "none: no sidecar has sent a heartbeat within its TTL" in text
    assert "! no stream holds station.coding.task" in text and "(no dead-letter stream)" in text


def test_text_from_the_network_cannot_drive_the_terminal():
    """Heartbeats and task ids are anyone's writes: control characters are shown, never sent."""
    status = FleetStatus(
        sidecars=[FleetSidecar.model_validate({**beat(id="\x1b[31mred", runningTasks=["\x1b]0;title\x07"]), "age": 1})],
        queue=QueueStatus(oldestWaiting=WaitingTask(taskID="\x1b[2Jgone", seq=3, enqueued="2026-01-01T00:00:00Z",
                                                    age=1)),
    )
    text = render_fleet(status)
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b[31mred" in text and "\\x1b]0;title\\x07" in text and "task \\x1b[2Jgone" in text


def test_a_heartbeat_with_negative_slots_or_unparsable_text_is_not_one():
    with pytest.raises(ValueError):
        SidecarHeartbeat.model_validate(beat(slotsFree=-3))
    assert json_object(b"[" * 50_000 + b"]" * 50_000) is None  # too deep for the parser: no object
    assert json_object(b"\xff not json") is None
