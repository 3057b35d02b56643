"""The six coding tools over a scripted backend: Station's field names in and out, schemas an LLM can
use, session lookup by ID or title fragment, results and traces mapped from tasks and operations."""

from __future__ import annotations

import re
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as SchemaError
from pydantic import ValidationError

from ocbridge.client.protocol import (
    FileChange,
    GitOpRequest,
    GitOpResult,
    ResultMetrics,
    ResultSession,
    SessionState,
    StreamEvent,
    Task,
    TaskResult,
    ToolInfo,
)
from ocbridge.client.station.backends.base import CodingBackend
from ocbridge.client.station.tools import (
    TOOL_MODELS,
    TOOL_NAMES,
    TOOL_SCHEMAS,
    CodingToolError,
    CodingTools,
    SessionLookupError,
    ToolDefaults,
    anthropic_tools,
    build_prompt,
    find_session,
    openai_tools,
)

STATION_FIELDS = {
    "coding_open": ({"repo_url", "branch", "workspace_path", "title", "scope", "scope_id", "existing_session_id"},
                    set(), {"session_id", "workspace_path", "workspace_id", "repo_cloned", "managed"}),
    "code": ({"session_id", "instruction", "context", "files"}, {"session_id", "instruction"},
             {"success", "summary", "files_changed", "error", "tokens_used", "cost", "trace"}),
    "coding_branch": ({"session_id", "branch", "create"}, {"session_id", "branch"},
                      {"success", "branch", "created", "switched_to", "previous_branch", "error"}),
    "coding_commit": ({"session_id", "message", "add_all"}, {"session_id", "message"},
                      {"success", "commit_hash", "message", "files_changed", "insertions", "deletions", "error"}),
    "coding_push": ({"session_id", "remote", "branch", "set_upstream"}, {"session_id"},
                    {"success", "remote", "branch", "message", "error"}),
    "coding_close": ({"session_id", "workspace_id", "success"}, {"session_id"}, {"ok", "files_changed", "cleaned_up"}),
}


def state(name: str, title: str | None = None, engine_id: str = "", workspace: str | None = None) -> SessionState:
    return SessionState(sessionName=name, opencodeID=engine_id or f"ses_{name}", workspaceName=workspace or name,
                        workspacePath=f"/ws/{workspace or name}", created="2026-01-01T00:00:00.000Z",
                        lastUsed="2026-01-01T00:00:00.000Z", title=title)


def event(seq: int, kind: str, **fields: Any) -> StreamEvent:
    return StreamEvent(taskID="t", seq=seq, timestamp="2026-01-01T00:00:00.000Z", type=kind, **fields)


class FakeBackend(CodingBackend):
    """Records requests; answers from scripted replies."""

    name = "fake"

    def __init__(self) -> None:
        self.ops: list[GitOpRequest] = []
        self.tasks: list[Task] = []
        self.replies: dict[str, GitOpResult] = {}
        self.known: list[SessionState] = []
        self.events: list[StreamEvent] = []
        self.result: TaskResult | None = None
        self.fail: Exception | None = None
        self.started = 0

    async def start(self) -> None:
        self.started += 1

    async def run(self, task, on_event=None):
        self.tasks.append(task)
        if self.fail:
            raise self.fail
        for e in self.events:
            await on_event(e)
        return self.result or TaskResult(taskID=task.task_id, status="completed", result="done")

    async def op(self, request):
        self.ops.append(request)
        if self.fail:
            raise self.fail
        if request.op == "open":
            self.known.append(state(request.session, request.title, workspace=request.workspace))
            return self.replies.get("open") or GitOpResult(
                ok=True, op="open", session=request.session, opencodeID="ses_new",
                workspacePath=f"/root/{request.workspace}", repoCloned=request.git is not None, managed=True)
        return self.replies.get(request.op) or GitOpResult(ok=True, op=request.op)

    async def sessions(self):
        return list(self.known)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def tools(backend) -> CodingTools:
    return CodingTools(backend, defaults=ToolDefaults(task_timeout=90, cleanup_policy="on_success",
                                                      git_token="tok-1", model="p/m"))


# ------------------------------------------------------------------------------------------ schemas


@pytest.mark.parametrize("name", list(STATION_FIELDS))
def test_schemas_have_stations_fields_and_required_marks(name):
    inputs, required, outputs = STATION_FIELDS[name]
    schema = TOOL_SCHEMAS[name]
    Draft202012Validator.check_schema(schema)
    assert set(schema["properties"]) == inputs == set(TOOL_MODELS[name][0].model_fields)
    assert set(schema["required"]) == required
    assert set(TOOL_MODELS[name][1].model_fields) - {"old_path"} == outputs
    assert schema["additionalProperties"] is False
    assert all(p.get("description") for p in schema["properties"].values())
    required_in_model = {k for k, f in TOOL_MODELS[name][0].model_fields.items() if f.is_required()}
    assert required_in_model == required


def test_schemas_accept_good_calls_and_refuse_bad_ones():
    validate = lambda name, args: Draft202012Validator(TOOL_SCHEMAS[name]).validate(args)  # noqa: E731
    validate("coding_open", {"repo_url": "https://x/y.git", "scope": "workflow", "scope_id": "wf-1"})
    validate("code", {"session_id": "s", "instruction": "do it", "files": ["a.py"]})
    for name, args in [("code", {"session_id": "s"}), ("coding_open", {"scope": "team"}),
                       ("coding_commit", {"session_id": "s", "message": "m", "amend": True}),
                       ("coding_branch", {"session_id": "s", "branch": "b", "create": "yes"})]:
        with pytest.raises(SchemaError):
            validate(name, args)


def _noise(schema: Any) -> list[str]:
    """Keys MCP and LLM clients choke on or do not need, anywhere in a schema (property names aside)."""
    if isinstance(schema, list):
        return [k for item in schema for k in _noise(item)]
    if not isinstance(schema, dict):
        return []
    found = [k for k in schema if k in ("title", "$defs", "$ref", "anyOf", "allOf", "oneOf")]
    for key, value in schema.items():
        children = value.values() if key == "properties" else [value]
        found += [k for child in children for k in _noise(child)]
    return found


@pytest.mark.parametrize("name", list(STATION_FIELDS))
def test_schemas_are_generated_from_the_models_without_noise(name):
    schema = TOOL_SCHEMAS[name]
    assert _noise(schema) == []
    assert "description" not in schema  # the tool's description is TOOL_DESCRIPTIONS
    model = TOOL_MODELS[name][0]
    for arg, prop in schema["properties"].items():
        assert prop["description"] == model.model_fields[arg].description


SCHEMA_CASES = [
    ("coding_open", {}, True),
    ("coding_open", {"repo_url": "https://x/y.git", "branch": "dev", "title": "t"}, True),
    ("coding_open", {"scope": "workflow", "scope_id": "wf-1"}, True),
    ("coding_open", {"scope": "team"}, False),
    ("coding_open", {"repo": "https://x/y.git"}, False),
    ("coding_open", {"title": 5}, False),
    ("code", {"session_id": "s", "instruction": "do it", "files": ["a.py"], "context": "c"}, True),
    ("code", {"session_id": "s"}, False),
    ("code", {"session_id": "", "instruction": "do it"}, False),
    ("code", {"session_id": "s", "instruction": "do it", "files": "a.py"}, False),
    ("code", {"session_id": "s", "instruction": "do it", "files": [1]}, False),
    ("coding_branch", {"session_id": "s", "branch": "b", "create": False}, True),
    ("coding_branch", {"session_id": "s", "branch": ""}, False),
    ("coding_branch", {"session_id": "s", "branch": "b", "create": [True]}, False),
    ("coding_commit", {"session_id": "s", "message": "m", "add_all": True}, True),
    ("coding_commit", {"session_id": "s", "message": "m", "amend": True}, False),
    ("coding_push", {"session_id": "s", "remote": "up", "branch": "b", "set_upstream": True}, True),
    ("coding_push", {"session_id": "s", "remote": None}, False),
    ("coding_push", {}, False),
    ("coding_close", {"session_id": "s", "workspace_id": "w", "success": False}, True),
    ("coding_close", {"session_id": "s", "success": {}}, False),
]


@pytest.mark.parametrize(("name", "args", "valid"), SCHEMA_CASES)
def test_each_schema_accepts_what_its_model_accepts(name, args, valid):
    # Known, deliberate differences (not listed above): the models also take an explicit null for an
    # optional argument and pydantic's lax coercions ("yes" for true); the schemas advertise the plain
    # JSON types, which is what an LLM should send.
    try:
        TOOL_MODELS[name][0].model_validate(args)
        model_ok = True
    except ValidationError:
        model_ok = False
    schema_ok = Draft202012Validator(TOOL_SCHEMAS[name]).is_valid(args)
    assert (model_ok, schema_ok) == (valid, valid)


def test_llm_tool_formats():
    assert TOOL_NAMES == ("coding_open", "code", "coding_branch", "coding_commit", "coding_push", "coding_close")
    openai = openai_tools()
    assert [t["function"]["name"] for t in openai] == list(TOOL_NAMES)
    assert openai[1]["function"]["parameters"]["required"] == ["session_id", "instruction"]
    anthropic = anthropic_tools()
    assert anthropic[0]["input_schema"] == TOOL_SCHEMAS["coding_open"] and anthropic[0]["description"]
    anthropic[0]["input_schema"]["properties"].clear()  # copies: the module's schemas stay intact
    assert TOOL_SCHEMAS["coding_open"]["properties"]


# ------------------------------------------------------------------------------- session matching

SESSIONS = [
    state("coding-aaaa1111", "Create feature branch for user-auth", "ses_47b8a7be0ffeA"),
    state("coding-bbbb2222", "Fix login validation bug", "ses_483ea4a0bffeB"),
    state("coding-cccc3333", "Add unit tests for login", "0b7c3a2e-2f7d-4d4c-9a51-3f1f7e8a9b10"),
]


@pytest.mark.parametrize(("ref", "expected"), [
    ("ses_483ea4a0bffeB", "coding-bbbb2222"),                    # engine session id
    ("0b7c3a2e-2f7d-4d4c-9a51-3f1f7e8a9b10", "coding-cccc3333"),  # Claude Code's ids are UUIDs
    ("coding-aaaa1111", "coding-aaaa1111"),                      # session name
    ("user-auth", "coding-aaaa1111"),                            # part of the title
    ("FEATURE BRANCH", "coding-aaaa1111"),                       # case-insensitive
    ("validation", "coding-bbbb2222"),
    ("cccc", "coding-cccc3333"),                                 # part of the name
])
def test_find_session(ref, expected):
    assert find_session(SESSIONS, ref).session_name == expected


def test_find_session_ambiguous_and_missing_say_what_exists():
    with pytest.raises(SessionLookupError) as info:
        find_session(SESSIONS, "login")
    message = str(info.value)
    assert message.startswith("2 sessions match 'login'; give more of the title or the session ID")
    assert "coding-bbbb2222 'Fix login validation bug' [ses_483ea4a0bffeB]" in message
    assert "coding-cccc3333" in message and "coding-aaaa1111" not in message
    with pytest.raises(SessionLookupError, match=r"no session has the ID 'ses_nope'\. Known sessions: coding-aaaa"):
        find_session(SESSIONS, "ses_nope")
    with pytest.raises(SessionLookupError, match="no session name or title contains 'payments'"):
        find_session(SESSIONS, "payments")
    with pytest.raises(SessionLookupError, match="There are no sessions"):
        find_session([], "anything")


# ---------------------------------------------------------------------------------------- the tools


async def test_open_clones_into_a_managed_workspace(tools, backend):
    out = await tools.coding_open({"repo_url": "https://git.example/r.git", "branch": "dev", "title": "Add health"})
    assert re.fullmatch(r"coding-[0-9a-f]{8}", out["session_id"])
    assert out == {"session_id": out["session_id"], "workspace_path": f"/root/{out['session_id']}",
                   "workspace_id": out["session_id"], "repo_cloned": True, "managed": True}
    request = backend.ops[0]
    assert (request.op, request.session, request.title, request.cleanup) == ("open", out["session_id"],
                                                                             "Add health", "on_success")
    assert (request.git.url, request.git.branch, request.git.token.get_secret_value()) == (
        "https://git.example/r.git", "dev", "tok-1")
    assert backend.started == 1


async def test_open_existing_folder_workflow_scope_and_continuation(tools, backend):
    out = await tools.coding_open({"workspace_path": "/srv/project"})
    assert backend.ops[-1].workspace == "/srv/project" and backend.ops[-1].git is None
    assert "repo_cloned" not in out
    await tools.coding_open({"scope": "workflow", "scope_id": "wf-9", "title": "Nightly dependency bump"})
    assert (backend.ops[-1].workspace, backend.ops[-1].scope, backend.ops[-1].scope_id) == (
        "workflow-wf-9", "workflow", "wf-9")
    first = backend.ops[-1].session
    again = await tools.coding_open({"existing_session_id": "dependency BUMP"})
    assert again["session_id"] == first
    assert (backend.ops[-1].session, backend.ops[-1].workspace, backend.ops[-1].title) == (
        first, "workflow-wf-9", "Nightly dependency bump")
    with pytest.raises(CodingToolError, match="coding_open: no session name or title contains 'zzz'"):
        await tools.coding_open({"existing_session_id": "zzz"})


async def test_open_failures_raise(tools, backend):
    backend.replies["open"] = GitOpResult(ok=False, op="open", error="clone failed: repository not found",
                                          errorType="git_error")
    with pytest.raises(CodingToolError, match="coding_open: clone failed: repository not found"):
        await tools.coding_open({"repo_url": "https://git.example/missing.git"})
    with pytest.raises(CodingToolError, match=r"coding_open: invalid arguments: scope: Input should be"):
        await tools.coding_open({"scope": "team"})
    with pytest.raises(CodingToolError, match="repo: unknown argument"):
        await tools.coding_open({"repo": "x"})


async def test_code_runs_a_task_and_maps_result_and_trace(tools, backend):
    session = (await tools.coding_open({"title": "t"}))["session_id"]
    backend.events = [
        event(1, "prompt_sent", content="..."),
        event(2, "thinking", content="I should "), event(3, "thinking", content="write the file."),
        event(4, "tool_start", tool=ToolInfo(name="write", callID="c1", args={"filePath": "hello.txt"})),
        event(5, "tool_end", tool=ToolInfo(name="write", callID="c1", output="Wrote", duration=12)),
        event(6, "tool_end", tool=ToolInfo(name="bash", callID="c2", args={"command": "false"}, output="exit 1",
                                           duration=3, error=True)),
        event(7, "text", content="Done. "), event(8, "text", content="Wrote hello.txt."),
    ]
    backend.result = TaskResult(
        taskID="x", status="completed", result="Done. Wrote hello.txt.",
        session=ResultSession(name=session, opencodeID="ses_abc"),
        metrics=ResultMetrics(duration=1500, promptTokens=100, completionTokens=20, cost=0.25),
        changes=[FileChange(path="hello.txt", status="added", insertions=1, deletions=0),
                 FileChange(path="b.py", status="renamed", oldPath="a.py", insertions=0, deletions=0)],
    )
    out = await tools.code({"session_id": session, "instruction": "create hello.txt with content hi",
                            "context": "A demo repo", "files": ["hello.txt", "README.md"]})
    task = backend.tasks[0]
    assert task.prompt == ("Context: A demo repo\n\nTask: create hello.txt with content hi\n\n"
                           "Focus on these files: hello.txt, README.md")
    assert (task.session.name, task.session.reuse, task.workspace.name, task.timeout, str(task.model)) == (
        session, True, session, 90_000, "p/m")
    assert out == {
        "success": True,
        "summary": "Done. Wrote hello.txt.",
        "files_changed": [{"path": "hello.txt", "action": "created", "lines_added": 1, "lines_removed": 0},
                          {"path": "b.py", "action": "renamed", "lines_added": 0, "lines_removed": 0,
                           "old_path": "a.py"}],
        "tokens_used": 120,
        "cost": 0.25,
        "trace": {
            "session_id": "ses_abc", "tokens": {"input": 100, "output": 20}, "cost": 0.25, "duration_ms": 1500,
            "tool_calls": [
                {"tool": "write", "call_id": "c1", "input": {"filePath": "hello.txt"}, "output": "Wrote",
                 "duration_ms": 12},
                {"tool": "bash", "call_id": "c2", "input": {"command": "false"}, "output": "exit 1",
                 "error": "exit 1", "duration_ms": 3},
            ],
            "reasoning": ["I should write the file."],
            "text": "Done. Wrote hello.txt.",
        },
    }


async def test_code_failures_are_results_not_exceptions(tools, backend):
    session = (await tools.coding_open({}))["session_id"]
    backend.result = TaskResult(taskID="x", status="timeout", result="partial", error="task timed out after 90s",
                                errorType="timeout")
    out = await tools.code({"session_id": session, "instruction": "slow 200"})
    assert (out["success"], out["summary"], out["error"]) == (False, "partial", "task timed out after 90s")
    backend.fail = ConnectionError("NATS is down")
    out = await tools.code({"session_id": session, "instruction": "x"})
    assert out == {"success": False, "summary": "", "error": "code: NATS is down"}
    out = await tools.code({"session_id": "coding-unknown", "instruction": "x"})
    assert out["success"] is False and "unknown session 'coding-unknown'" in out["error"]
    with pytest.raises(CodingToolError, match="code: invalid arguments: instruction: Field required"):
        await tools.code({"session_id": session})


async def test_code_finds_sessions_opened_elsewhere(tools, backend):
    backend.known.append(state("coding-other", "x", workspace="shared-ws"))
    await tools.code({"session_id": "coding-other", "instruction": "x"})
    assert backend.tasks[0].workspace.name == "shared-ws"


async def test_git_tools_map_gits_answers(tools, backend):
    backend.replies["branch"] = GitOpResult(ok=True, op="branch", branch="feature/x", created=True,
                                            switchedTo="feature/x", previousBranch="main")
    assert await tools.coding_branch({"session_id": "s", "branch": "feature/x"}) == {
        "success": True, "branch": "feature/x", "created": True, "switched_to": True, "previous_branch": "main"}
    assert (backend.ops[-1].op, backend.ops[-1].branch, backend.ops[-1].create) == ("branch", "feature/x", True)

    backend.replies["commit"] = GitOpResult(ok=True, op="commit", commitHash="a" * 40, filesChanged=2,
                                            insertions=5, deletions=1)
    assert await tools.coding_commit({"session_id": "s", "message": "add", "add_all": False}) == {
        "success": True, "commit_hash": "a" * 40, "message": "add", "files_changed": 2, "insertions": 5,
        "deletions": 1}
    assert backend.ops[-1].add_all is False

    backend.replies["push"] = GitOpResult(ok=True, op="push", remote="origin", branch="feature/x",
                                          message="new branch feature/x")
    assert await tools.coding_push({"session_id": "s", "set_upstream": True}) == {
        "success": True, "remote": "origin", "branch": "feature/x", "message": "new branch feature/x"}
    push = backend.ops[-1]
    assert (push.remote, push.set_upstream, push.token.get_secret_value()) == ("origin", True, "tok-1")


async def test_git_tool_failures_are_results(tools, backend):
    backend.replies["commit"] = GitOpResult(ok=False, op="commit", error="nothing to commit", errorType="git_error")
    assert await tools.coding_commit({"session_id": "s", "message": "m"}) == {
        "success": False, "message": "m", "error": "nothing to commit"}
    backend.replies["branch"] = GitOpResult(ok=False, op="branch", error="branch 'x' does not exist")
    out = await tools.coding_branch({"session_id": "s", "branch": "x", "create": False})
    assert out == {"success": False, "branch": "x", "created": False, "switched_to": False,
                   "error": "branch 'x' does not exist"}
    backend.fail = TimeoutError("no reply from the sidecar within 180s")
    out = await tools.coding_push({"session_id": "s", "remote": "upstream", "branch": "b"})
    assert out == {"success": False, "remote": "upstream", "branch": "b",
                   "error": "coding_push: no reply from the sidecar within 180s"}


async def test_close_reports_changes_and_cleanup(tools, backend):
    backend.replies["close"] = GitOpResult(ok=True, op="close", cleanedUp=True, changes=[
        FileChange(path="x.txt", status="modified", insertions=2, deletions=1)])
    assert await tools.coding_close({"session_id": "s", "success": False}) == {
        "ok": True, "cleaned_up": True,
        "files_changed": [{"path": "x.txt", "action": "modified", "lines_added": 2, "lines_removed": 1}]}
    assert backend.ops[-1].success is False
    backend.replies["close"] = GitOpResult(ok=False, op="close", error="no session named 's'")
    with pytest.raises(CodingToolError, match="coding_close: no session named 's'"):
        await tools.coding_close({"session_id": "s"})


async def test_call_dispatches_by_name(tools):
    out = await tools.call("coding_open", {"title": "x"})
    assert out["managed"] is True
    with pytest.raises(CodingToolError, match="unknown tool 'coding_delete'"):
        await tools.call("coding_delete", {})


def test_build_prompt_like_station():
    assert build_prompt("Add /health") == "Add /health"
    assert build_prompt("Add /health", "Flask API") == "Context: Flask API\n\nTask: Add /health"
