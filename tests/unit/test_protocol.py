"""The wire models read and write Station's exact messages."""

import json

import pytest

from ocbridge.client.protocol import SessionState, StreamEvent, Task, TaskResult, TaskStatus, ValidationError

STATION_TASK = {
    "taskID": "6f1d2c3a-8b7e-4c55-9a01-2f3e4d5c6b7a",
    "session": {"name": "session-1a2b3c4d", "continue": True},
    "workspace": {
        "name": "/workspaces/station-coding/ws_1736200000000000000",
        "git": {"url": "https://github.com/org/repo.git", "branch": "main", "pull": True},
    },
    "prompt": "Context: Flask API\n\nTask: Add a /health endpoint",
    "timeout": 600000,
    "callback": {"streamSubject": "station.coding.stream.6f1d", "resultSubject": "station.coding.result.6f1d"},
    "futureField": {"kept": 1},
}


def test_station_task_round_trips_with_unknown_fields_kept():
    task = Task.from_wire(json.dumps(STATION_TASK))
    assert task.task_id == STATION_TASK["taskID"]
    assert task.session.reuse is True
    assert task.timeout == 600000
    assert task.workspace.git.branch == "main"
    assert task.to_dict() == STATION_TASK


def test_continue_false_means_new_session_and_absent_means_reuse():
    data = dict(STATION_TASK, session={"name": "s", "continue": False})
    assert Task.from_wire(data).session.reuse is False
    data = dict(STATION_TASK, session={"name": "s"})
    assert Task.from_wire(data).session.reuse is True


def test_git_token_is_hidden_in_repr_but_sent_on_the_wire():
    data = json.loads(json.dumps(STATION_TASK))
    data["workspace"]["git"]["token"] = "ghp_canary_secret_value_123456"
    task = Task.from_wire(data)
    assert "ghp_canary" not in repr(task)
    assert task.to_dict()["workspace"]["git"]["token"] == "ghp_canary_secret_value_123456"


@pytest.mark.parametrize("missing", ["taskID", "prompt", "callback", "session", "workspace"])
def test_missing_required_fields_are_rejected(missing):
    data = {k: v for k, v in STATION_TASK.items() if k != missing}
    with pytest.raises(ValidationError):
        Task.from_wire(data)


def test_result_serialises_camel_case_and_omits_absent_fields():
    result = TaskResult(taskID="t1", status=TaskStatus.TIMEOUT, error="slow", errorType="timeout")
    wire = result.to_dict()
    assert wire["status"] == "timeout"
    assert wire["errorType"] == "timeout"
    assert wire["metrics"] == {"duration": 0, "promptTokens": 0, "completionTokens": 0, "toolCalls": 0,
                               "streamEvents": 0}
    assert "session" not in wire


def test_event_and_session_state_accept_station_samples():
    event = StreamEvent.from_wire({
        "taskID": "t", "seq": 3, "timestamp": "2026-01-02T10:11:12.345Z", "type": "tool_end",
        "tool": {"name": "write", "callID": "c1", "output": "ok", "duration": 12},
    })
    assert event.tool.duration == 12
    state = SessionState.from_wire({
        "sessionName": "s", "opencodeID": "ses_1", "workspaceName": "w", "workspacePath": "/w",
        "created": "x", "lastUsed": "y", "messageCount": 3,
        "git": {"url": "u", "branch": "main", "lastCommit": "abc"},
    })
    assert state.git.last_commit == "abc"
