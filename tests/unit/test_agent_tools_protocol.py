"""The agent's Station tools without an agent: MCP JSON-RPC handling, the HTTP endpoint and its
tokens, the key policy (deny list, reserved, private and credential-shaped keys), on real folder
stores, a real loopback listener and real git."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ocbridge.bridge.agent_tools import (
    DEFAULT_DENY_KEYS,
    AgentToolsServer,
    AgentToolsSettings,
    Caller,
    Dispatcher,
    Grants,
    KeyPolicy,
    RunScope,
    ToolRefused,
    ToolResult,
    ToolSpec,
)
from ocbridge.bridge.config import ConfigError, load_config
from ocbridge.bridge.offline_model.conversation import Conversation, Message
from ocbridge.bridge.offline_model.conversation import ToolSpec as OfferedTool
from ocbridge.bridge.offline_model.script import respond
from ocbridge.bridge.redact import MASK, Redactor
from ocbridge.bridge.storage.stores import FolderKeyValue
from ocbridge.client.protocol import SessionGit, SessionState

# --------------------------------------------------------------------------------- JSON-RPC


def rpc(method: str, params: Any = None, id: Any = 1) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


@pytest.fixture
def dispatcher() -> Dispatcher[str]:
    async def call(name: str, arguments: dict[str, Any], context: str) -> ToolResult:
        if arguments.get("explode"):
            raise RuntimeError("boom")
        return ToolResult({"tool": name, "args": arguments, "caller": context})

    spec = ToolSpec("echo", "Echo the arguments.", {"type": "object", "properties": {"x": {"type": "string"}}})
    return Dispatcher([spec], call, name="test", version="1.0", instructions="use echo")


async def test_initialize_lists_tools_and_calls_them(dispatcher):
    init = await dispatcher.answer(rpc("initialize", {"protocolVersion": "2025-03-26", "capabilities": {},
                                                      "clientInfo": {"name": "c", "version": "1"}}), "caller-1")
    assert init.status == 200
    assert init.body["result"] == {
        "protocolVersion": "2025-03-26", "capabilities": {"tools": {"listChanged": False}},
        "serverInfo": {"name": "test", "version": "1.0"}, "instructions": "use echo",
    }
    newer = await dispatcher.answer(rpc("initialize", {"protocolVersion": "2099-01-01"}), "c")
    assert newer.body["result"]["protocolVersion"] == "2025-11-25"  # ours; the client decides
    initialized = await dispatcher.answer(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}', "c")
    assert (initialized.status, initialized.body) == (202, None)
    listed = await dispatcher.answer(rpc("tools/list", id="a"), "c")
    assert listed.body == {"jsonrpc": "2.0", "id": "a", "result": {"tools": [
        {"name": "echo", "description": "Echo the arguments.",
         "inputSchema": {"type": "object", "properties": {"x": {"type": "string"}}}}]}}
    called = await dispatcher.answer(rpc("tools/call", {"name": "echo", "arguments": {"x": "y"}}, id=7), "caller-1")
    result = called.body["result"]
    assert result["isError"] is False
    assert json.loads(result["content"][0]["text"]) == {"tool": "echo", "args": {"x": "y"}, "caller": "caller-1"}
    assert (await dispatcher.answer(rpc("ping"), "c")).body["result"] == {}


async def test_bad_messages_get_json_rpc_errors_and_failing_tools_error_results(dispatcher):
    async def error_of(body: bytes) -> tuple[int, int]:
        answer = await dispatcher.answer(body, "c")
        return answer.status, answer.body["error"]["code"]

    assert await error_of(b"{not json") == (400, -32700)
    # Too deep for the JSON parser itself, and deeper than any MCP message needs: parse errors.
    assert await error_of(b"[" * 90_000 + b"]" * 90_000) == (400, -32700)
    deep: list = []
    for _ in range(40):
        deep = [deep]
    assert await error_of(rpc("tools/call", {"name": "echo", "arguments": {"x": deep}})) == (400, -32700)
    assert await error_of(b'{"id": 1, "method": "ping"}') == (400, -32600)  # no "jsonrpc": "2.0"
    assert await error_of(b'"ping"') == (400, -32600)
    assert await error_of(rpc("ping", id=True)) == (400, -32600)
    assert await error_of(rpc("resources/list")) == (200, -32601)
    assert await error_of(rpc("tools/call", {"name": "nope"})) == (200, -32602)
    assert await error_of(rpc("tools/call", {"arguments": {}})) == (200, -32602)
    assert await error_of(rpc("tools/call", ["not", "an", "object"])) == (200, -32602)
    assert await error_of(b"[]") == (400, -32600)
    not_object = await dispatcher.answer(rpc("tools/call", {"name": "echo", "arguments": "x=1"}), "c")
    assert not_object.body["result"] == {"content": [{"type": "text", "text": "arguments must be a JSON object"}],
                                         "isError": True}
    exploded = await dispatcher.answer(rpc("tools/call", {"name": "echo", "arguments": {"explode": True}}), "c")
    assert exploded.body["result"]["isError"] is True and "failed inside the bridge" in \
        exploded.body["result"]["content"][0]["text"]
    batch = await dispatcher.answer(
        b'[{"jsonrpc": "2.0", "method": "notifications/initialized"},' + rpc("ping", id=2) + b"]", "c")
    assert batch.status == 200 and batch.body == [{"jsonrpc": "2.0", "id": 2, "result": {}}]
    only_notes = await dispatcher.answer(b'[{"jsonrpc": "2.0", "method": "notifications/cancelled"}]', "c")
    assert (only_notes.status, only_notes.body) == (202, None)
    response = await dispatcher.answer(b'{"jsonrpc": "2.0", "id": 3, "result": {}}', "c")
    assert response.status == 202  # a response to a request we never sent is ignored


# ------------------------------------------------------------------------------------ policy


def policy(**settings: Any) -> KeyPolicy:
    return KeyPolicy(AgentToolsSettings(**settings), Redactor())


def refused(check, *args, **kwargs) -> str:
    with pytest.raises(ToolRefused) as caught:
        check(*args, **kwargs)
    return str(caught.value)


ME = Caller("s1")


@pytest.mark.parametrize("key", [
    "github-token", "GITHUB_TOKEN", "deploy.Token", "db.password", "smtp-passwd", "aws.secret",
    "openai_api_key", "api-key", "ApiKey", "ssh-key", "deploy_keys", "id_rsa.private_key", "tls.pem",
    "session-cookie", "gcp.credentials", "my-creds", "oauth.refresh", "bearer.x",
])
def test_default_deny_list_refuses_credential_keys_both_ways(key):
    rules = policy()
    for write in (False, True):
        message = refused(rules.check, "state", key, ME, write=write)
        assert "may hold a credential" in message and ("writable" if write else "readable") in message


@pytest.mark.parametrize("key", ["plan", "plan.step-2", "notes/today", "results.build_1", "a=b", "keyboard.layout"])
def test_ordinary_keys_pass(key):
    rules = policy()
    assert rules.key(key, "state") == key
    rules.check("state", key, ME, write=False)
    rules.check("state", key, ME, write=True)


@pytest.mark.parametrize("key", ["cancel.task-1", "ocbridge.workspace./w/x", "OCBRIDGE.anything"])
def test_the_bridges_own_keys_are_reserved_whatever_the_configuration(key):
    rules = policy(deny_keys=[])
    assert "reserved for the bridge" in refused(rules.check, "state", key, ME, write=False)


def test_keys_used_as_token_from_kv_are_refused_from_then_on():
    rules = policy()
    rules.check("state", "deploy", ME, write=False)
    rules.remember_token_key("deploy")
    assert "may hold a credential" in refused(rules.check, "state", "deploy", ME, write=False)


@pytest.mark.parametrize("key", ["", "../x", "a..b", ".a", "a.", "with space", "b64=abc", "a*", "x" * 257, "tab\t"])
def test_malformed_state_keys_are_refused(key):
    assert refused(policy().key, key, "state")


def test_arguments_of_the_wrong_type_or_size():
    rules = policy(max_value_bytes=16)
    assert "non-empty string" in refused(rules.key, 5, "state")
    assert 'must be "state" or "sessions"' in refused(rules.bucket, "objects")
    assert rules.bucket(None) == "state" and rules.bucket("sessions") == "sessions"
    assert rules.key("any name: even spaces", "sessions") == "any name: even spaces"  # session names
    assert "must be a string" in refused(rules.value, {"a": 1})
    assert "at most 16" in refused(rules.value, "x" * 17)
    assert rules.value("é" * 8) == "é" * 8  # 16 bytes
    assert "at most 16" in refused(rules.readable, "k", b"y" * 17)
    assert "not UTF-8" in refused(rules.readable, "k", b"\xff\xfe")


def test_values_that_look_like_credentials_are_neither_returned_nor_stored():
    redactor = Redactor(["registered-secret-value"])
    rules = KeyPolicy(AgentToolsSettings(), redactor)
    for value in ("ghp_" + "a" * 36, "see https://user:pw@host/x", "the registered-secret-value here"):
        assert "looks like it holds a credential" in refused(rules.readable, "plain", value.encode())
        assert "looks like it holds a credential" in refused(rules.value, value)
    assert rules.readable("plain", b"just text") == "just text"


def test_allow_list_mode_and_private_keys():
    strict = policy(allow_keys=["shared.*"])
    strict.check("state", "shared.plan", ME, write=True)
    assert "not among the keys" in refused(strict.check, "state", "plan", ME, write=False)
    assert "may hold a credential" in refused(strict.check, "state", "shared.token", ME, write=False)

    private = policy(private_prefix="private.")
    private.check("state", "private.s1.notes", Caller("s1"), write=True)
    private.check("state", "private.s1.notes", Caller("s1"), write=False)
    assert "private to another session" in refused(private.check, "state", "private.s1.notes", Caller("s2"),
                                                   write=False)
    assert "private to another session" in refused(private.check, "state", "private.s1x.a", Caller("s1"),
                                                   write=False)
    assert "caller's session is unknown" in refused(private.check, "state", "private.s1.notes",
                                                    Caller(None, ("s1", "s2")), write=False)
    private.check("state", "public.notes", Caller(None, ("s1", "s2")), write=False)


def test_sessions_bucket_is_read_only_and_optionally_isolated():
    rules = policy()
    rules.check("sessions", "other", ME, write=False)
    assert "read-only" in refused(rules.check, "sessions", "s1", ME, write=True)
    isolated = policy(isolate_sessions=True, sessions_writable=True)
    isolated.check("sessions", "s1", ME, write=True)
    assert "only see its own" in refused(isolated.check, "sessions", "other", ME, write=False)
    assert "cannot be told apart" in refused(isolated.own_session, "s1", Caller(None, ("s1", "s2")))


# ------------------------------------------------------------------------------------ grants


def scope(task: str, session: str, path: str = "/w/a") -> RunScope:
    return RunScope(task, session, "a", Path(path))


def test_tokens_per_run_or_per_directory_and_revoked_with_the_last_run():
    redactor = Redactor()
    grants = Grants(redactor)
    one = grants.attach(scope("t1", "s1"))
    other = grants.attach(scope("t2", "s1"))
    assert one.token != other.token and len(one.token) >= 40
    assert redactor.text(f"x {one.token} y") == f"x {MASK} y"
    grants.detach(one, "t1")
    assert grants.lookup(one.token) is None and grants.lookup(other.token) is other
    assert redactor.text(one.token) == one.token  # no longer registered

    first = grants.attach(scope("t3", "s1", "/w/shared"), shared_key="/w/shared")
    second = grants.attach(scope("t4", "s2", "/w/shared"), shared_key="/w/shared")
    assert first is second and first.caller() == Caller(None, ("s1", "s2"))
    grants.detach(first, "t3")
    assert grants.lookup(first.token) is first and first.caller() == Caller("s2", ("s2",))
    grants.detach(first, "t4")
    assert grants.lookup(first.token) is None
    third = grants.attach(scope("t5", "s1", "/w/shared"), shared_key="/w/shared")
    assert third.token != first.token
    assert grants.lookup("") is None and grants.lookup("x" * 500) is None


def test_a_directory_token_lingers_inert_for_the_next_run_there():
    redactor = Redactor()
    grants = Grants(redactor, linger=60)
    first = grants.attach(scope("t1", "s1", "/w/a"), shared_key="/w/a")
    grants.detach(first, "t1")
    assert grants.lookup(first.token) is None and grants.live == 0 and len(grants) == 1  # refused meanwhile
    assert redactor.text(first.token) == MASK  # still masked while it exists
    again = grants.attach(scope("t2", "s2", "/w/a"), shared_key="/w/a")
    assert again is first and grants.lookup(first.token) is first and first.caller() == Caller("s2", ("s2",))
    grants.detach(again, "t2")
    again.idle_since -= 61  # nobody took it up within the linger time
    other = grants.attach(scope("t3", "s1", "/w/b"), shared_key="/w/b")
    assert len(grants) == 1 and grants.lookup(other.token) is other
    fresh = grants.attach(scope("t4", "s1", "/w/a"), shared_key="/w/a")
    assert fresh.token != first.token and redactor.text(first.token) == first.token
    per_run = grants.attach(scope("t5", "s1"))
    grants.detach(per_run, "t5")
    assert grants.lookup(per_run.token) is None and per_run.token not in [g.token for g in (fresh, other)]
    grants.clear()
    assert len(grants) == 0 and grants.lookup(fresh.token) is None


# ----------------------------------------------------------------------- the HTTP endpoint


class Mcp:
    """A minimal MCP client over the real HTTP endpoint."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str | None) -> None:
        self.http, self.url = http, url
        self.headers = {"Accept": "application/json, text/event-stream"}
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"
        self.next_id = 0

    async def post(self, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.http.post(self.url, json=body, headers={**self.headers, **(headers or {})}) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None

    async def call(self, tool: str, **arguments: Any) -> tuple[bool, Any]:
        self.next_id += 1
        status, body = await self.post({"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call",
                                        "params": {"name": tool, "arguments": arguments}})
        assert status == 200, body
        result = body["result"]
        text = result["content"][0]["text"]
        return result["isError"], (text if result["isError"] else json.loads(text))


@pytest.fixture
async def endpoint(tmp_path):
    state, sessions = FolderKeyValue(tmp_path / "state"), FolderKeyValue(tmp_path / "sessions")
    redactor = Redactor()
    server = AgentToolsServer(AgentToolsSettings(private_prefix="private."), state=state, sessions=sessions,
                              redactor=redactor, workspace_root=tmp_path / "ws")
    async with server, aiohttp.ClientSession() as http:
        yield server, state, sessions, http


async def test_endpoint_refuses_without_a_live_token_and_serves_with_one(endpoint, tmp_path):
    server, state, _, http = endpoint
    anonymous = Mcp(http, server.url, None)
    assert (await anonymous.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))[0] == 401
    assert (await Mcp(http, server.url, "guessed").post({"jsonrpc": "2.0", "id": 1, "method": "ping"}))[0] == 401
    for method in ("GET", "DELETE"):
        async with http.request(method, server.url) as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "POST"

    workspace = tmp_path / "ws" / "a"
    async with server.grant(task_id="t1", session="s1", workspace_name="a", workspace_path=workspace) as tools:
        assert tools.name == "station" and tools.url == server.url
        assert tools.tools == ("station_kv_get", "station_kv_set", "station_session_info")
        token = tools.headers["Authorization"].removeprefix("Bearer ")
        client = Mcp(http, server.url, token)
        status, init = await client.post({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                                          "params": {"protocolVersion": "2025-06-18"}})
        assert status == 200 and init["result"]["capabilities"] == {"tools": {"listChanged": False}}
        assert (await client.post({"jsonrpc": "2.0", "method": "notifications/initialized"},
                                  {"MCP-Protocol-Version": "2025-06-18"}))[0] == 202
        assert (await client.post({"jsonrpc": "2.0", "id": 1, "method": "ping"},
                                  {"MCP-Protocol-Version": "1999-01-01"}))[0] == 400
        assert (await client.post({"jsonrpc": "2.0", "id": 1, "method": "ping"},
                                  {"Origin": "http://evil.example"}))[0] == 403
        assert (await client.post({"jsonrpc": "2.0", "id": 1, "method": "ping"},
                                  {"Origin": "http://localhost:3000"}))[0] == 200
        names = [t["name"] for t in (await client.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))[1]
                 ["result"]["tools"]]
        assert names == ["station_kv_get", "station_kv_set", "station_session_info"]

        assert await client.call("station_kv_set", key="plan.step-1", value="done: 3 files") == \
            (False, {"success": True})
        assert await state.get("plan.step-1") == b"done: 3 files"
        await state.put("from.station", b"hello agent")
        assert await client.call("station_kv_get", key="from.station") == (False, {"value": "hello agent"})
        assert await client.call("station_kv_get", key="absent") == (False, {"value": None})
        assert await client.call("station_kv_get", key="plan.step-1", bucket="state") == \
            (False, {"value": "done: 3 files"})
        await state.put("github-token", b"canary-value-1234")
        failed, message = await client.call("station_kv_get", key="github-token")
        assert failed and "may hold a credential" in message and "canary" not in message
        failed, message = await client.call("station_kv_set", key="x", value="v", extra=1)
        assert failed and "unexpected argument(s): extra" in message
        failed, message = await client.call("station_kv_set", key="x")
        assert failed and message == "value is required"
        failed, message = await client.call("station_kv_get", key=["x"])
        assert failed and "non-empty string" in message
        failed, message = await client.call("station_kv_set", key="private.s2.notes", value="x")
        assert failed and "private to another session" in message
        assert await client.call("station_kv_set", key="private.s1.notes", value="mine") == (False, {"success": True})
        assert await client.call("station_session_info", sessionName="nobody") == \
            (False, {"error": "Session not found"})
    # The run is over: its token is dead.
    assert (await client.post({"jsonrpc": "2.0", "id": 9, "method": "ping"}))[0] == 401
    assert len(server.grants) == 0


@pytest.fixture
def repo(tmp_path) -> tuple[Path, str]:
    """A git work tree under the workspace root on branch ``topic``, and its commit."""
    workspace = tmp_path / "ws" / "repo"
    workspace.mkdir(parents=True)
    env = {"GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for args in (["init", "-q", "-b", "topic"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                                                  "--allow-empty", "-m", "one"]):
        subprocess.run(["git", *args], cwd=workspace, env=env, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, env=env, check=True,
                            capture_output=True, text=True).stdout.strip()
    return workspace, commit


async def test_session_info_reads_branch_and_commit_from_git(endpoint, repo):
    server, _, sessions, http = endpoint
    workspace, commit = repo
    record = SessionState(sessionName="s1", opencodeID="ses_1", workspaceName="repo", workspacePath=str(workspace),
                          created="2026-01-01T00:00:00.000Z", lastUsed="2026-01-02T00:00:00.000Z", messageCount=4,
                          git=SessionGit(branch="old", lastCommit="0" * 40))
    await sessions.put("s1", json.dumps(record.to_dict()).encode())
    outside = record.model_copy(update={"session_name": "s2", "workspace_path": "/etc"})
    await sessions.put("s2", json.dumps(outside.to_dict()).encode())
    async with server.grant(task_id="t1", session="s1", workspace_name="repo", workspace_path=workspace) as tools:
        client = Mcp(http, server.url, tools.headers["Authorization"].removeprefix("Bearer "))
        assert await client.call("station_session_info") == (False, {
            "sessionName": "s1", "workspaceName": "repo", "workspacePath": str(workspace), "gitBranch": "topic",
            "gitCommit": commit, "messageCount": 4, "created": "2026-01-01T00:00:00.000Z",
            "lastUsed": "2026-01-02T00:00:00.000Z",
        })
        # A record pointing outside the workspace root: git is not run there, the record is told.
        failed, info = await client.call("station_session_info", sessionName="s2")
        assert not failed and (info["gitBranch"], info["gitCommit"]) == ("old", "0" * 40)
        failed, raw = await client.call("station_kv_get", key="s1", bucket="sessions")
        assert not failed and json.loads(raw["value"])["sessionName"] == "s1"


# -------------------------------------------------------------------- the offline model's commands


def conversation(prompt: str, tools: list[str], results: tuple[str, ...] = ()) -> Conversation:
    c = Conversation(system="Working directory: /ws", tools=[OfferedTool(name) for name in tools])
    c.messages.append(Message("user", texts=[prompt]))
    for result in results:
        c.messages += [Message("assistant", tool_calls=1), Message("user", tool_results=[result])]
    return c


@pytest.mark.parametrize("prefix", ["station_", "mcp__station__"])  # OpenCode's and Claude Code's naming
def test_offline_model_calls_station_tools_by_the_end_of_their_name(prefix):
    tools = ["bash", f"{prefix}station_kv_get", f"{prefix}station_kv_set", f"{prefix}station_session_info"]
    prompt = "kv set plan.a two words in sessions\nkv get plan.a\nsession info other\ntool kv_get {\"key\": 5}"
    calls = []
    for turn, result in enumerate(['{"success": true}', '{"value": "two words"}', '{"error": "x"}', "bad key"]):
        reply = respond(conversation(prompt, tools, tuple(calls)))
        (call,) = reply.tool_calls
        calls.append(result)
        expected = [(f"{prefix}station_kv_set", {"key": "plan.a", "value": "two words", "bucket": "sessions"}),
                    (f"{prefix}station_kv_get", {"key": "plan.a"}),
                    (f"{prefix}station_session_info", {"sessionName": "other"}),
                    (f"{prefix}station_kv_get", {"key": 5})][turn]
        assert (call.name, call.arguments) == expected
    final = respond(conversation(prompt, tools, tuple(calls)))
    assert not final.tool_calls
    assert 'Called station_kv_get plan.a: {"value": "two words"}' in final.text
    assert "Called kv_get: bad key" in final.text
    missing = respond(conversation("kv get plan.a", ["bash"]))
    assert "needs a tool this client does not offer" in missing.text


def test_configuration_from_file_keys_and_environment():
    config = load_config(overrides={"agent_tools": {"private_prefix": "private.", "allow_keys": ["shared.*"]}},
                         environ={"OCBRIDGE_AGENT_TOOLS__ENABLED": "false",
                                  "OCBRIDGE_AGENT_TOOLS__DENY_KEYS": '["*vault*"]'})
    tools = config.agent_tools
    assert (tools.enabled, tools.deny_keys, tools.allow_keys, tools.private_prefix) == \
        (False, ["*vault*"], ["shared.*"], "private.")
    assert load_config(environ={}).agent_tools.deny_keys == list(DEFAULT_DENY_KEYS)
    with pytest.raises(ConfigError, match=r"agent_tools\.server_name"):
        load_config(overrides={"agent_tools": {"server_name": "two words"}}, environ={})
    with pytest.raises(ConfigError, match=r"agent_tools\.private_prefix"):
        load_config(overrides={"agent_tools": {"private_prefix": "a b"}}, environ={})
