"""The agent's own Station tools (``station_kv_get``, ``station_kv_set``, ``station_session_info``)
through the whole stack, on every engine: a real nats-server, the sidecar's MCP endpoint, real
OpenCode (``opencode serve`` and ``opencode run``) and real Claude Code, driven by the offline model's
``kv get`` / ``kv set`` / ``session info`` / ``tool`` commands. Station's side of the state is read
and written with plain nats-py KV calls, as Station does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from ocbridge.bridge.sidecar import Sidecar
from ocbridge.client.client import CodingClient
from ocbridge.client.protocol import StreamEvent, TaskResult
from support.gitserver import GitHttpServer, git, make_remote
from support.stack import SidecarProcess, require_tools, sidecar_config, unique_naming

pytestmark = [pytest.mark.opencode, pytest.mark.slow]

ENGINES = ["opencode", "opencode-cli", "claudecode"]


class Stack:
    """A sidecar on one engine, a client, and Station's view of the state bucket."""

    def __init__(self, engine: str, sidecar: Sidecar, client: CodingClient, state: KeyValue) -> None:
        self.engine, self.sidecar, self.client, self.state = engine, sidecar, client, state

    async def run(self, prompt: str, **kwargs: Any) -> tuple[list[StreamEvent], TaskResult]:
        kwargs.setdefault("timeout", 120)
        handle = await self.client.submit(prompt, **kwargs)
        events = [event async for event in handle.events(timeout=150)]
        return events, await handle.result(timeout=30)


async def value_of(kv: KeyValue, key: str) -> bytes | None:
    try:
        return (await kv.get(key)).value
    except KeyNotFoundError:
        return None


def issued_tokens(sidecar: Sidecar) -> list[str]:
    """Every bearer token the sidecar's tools issue from now on (recorded as they are issued)."""
    grants, tokens = sidecar.agent_tools.grants, []
    attach = grants.attach

    def recording(*args: Any, **kwargs: Any):
        grant = attach(*args, **kwargs)
        tokens.append(grant.token)
        return grant

    grants.attach = recording  # type: ignore[method-assign]
    return tokens


def tool_ends(events: list[StreamEvent], suffix: str) -> list[Any]:
    return [e.tool for e in events if e.type == "tool_end" and e.tool and e.tool.name.endswith(suffix)]


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    return make_remote(tmp_path_factory.mktemp("remotes"))


@pytest.fixture(scope="module", params=ENGINES)
async def stack(request, nats_server, tmp_path_factory) -> AsyncIterator[Stack]:
    require_tools()
    tmp = tmp_path_factory.mktemp(f"tools-{request.param}")
    naming = unique_naming()
    config = sidecar_config(
        nats_server.url, tmp, naming, engine=request.param, concurrency=3,
        git={"allow_file_urls": True, "allowed_schemes": ["https", "http"]},
        agent_tools={"private_prefix": "private."},
    )
    sidecar = Sidecar(config)
    await sidecar.start()
    client = await CodingClient.connect(nats_server.url, naming=naming)
    state = await client.nc.jetstream().key_value(naming.state_bucket)
    yield Stack(request.param, sidecar, client, state)
    await client.close()
    await sidecar.stop(grace=5)
    assert sidecar.agent_tools is None


async def test_a_task_sets_a_key_and_station_reads_it_at_once(stack: Stack):
    key = f"plan.{uuid.uuid4().hex[:8]}"
    tokens = issued_tokens(stack.sidecar)
    events, result = await stack.run(f"kv set {key} built 3 files, all green", workspace=f"set-{stack.engine}")
    assert result.status == "completed", result.error
    assert (await stack.state.get(key)).value == b"built 3 files, all green"
    (end,) = tool_ends(events, "station_kv_set")
    assert end.error is False and json.loads(end.output) == {"success": True}
    start = next(e.tool for e in events if e.type == "tool_start" and e.tool.call_id == end.call_id)
    assert start.args == {"key": key, "value": "built 3 files, all green"}
    # The name the agent saw: OpenCode prefixes MCP tools with the server name, Claude Code with mcp__<server>__.
    assert end.name == ("mcp__station__station_kv_set" if stack.engine == "claudecode" else "station_station_kv_set")
    # The run's token stopped working with the run.
    assert len(tokens) == 1 and stack.sidecar.agent_tools.grants.live == 0
    async with aiohttp.ClientSession() as http, http.post(
        stack.sidecar.agent_tools.url, headers={"Authorization": f"Bearer {tokens[0]}"},
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
    ) as resp:
        assert resp.status == 401


async def test_station_sets_a_key_and_the_task_reads_it(stack: Stack):
    key, value = f"handoff.{uuid.uuid4().hex[:8]}", f"use the staging database {uuid.uuid4().hex[:6]}"
    await stack.state.put(key, value.encode())
    events, result = await stack.run(f"kv get {key}\nkv get missing.{uuid.uuid4().hex[:6]}",
                                     workspace=f"get-{stack.engine}")
    assert result.status == "completed", result.error
    assert value in result.result
    found, missing = tool_ends(events, "station_kv_get")
    assert json.loads(found.output) == {"value": value} and json.loads(missing.output) == {"value": None}


async def test_session_info_is_the_tasks_own_session_with_its_branch_and_commit(stack: Stack, remote):
    session = f"info-{stack.engine}"
    events, result = await stack.run("session info", workspace=f"info-{stack.engine}", session=session,
                                     git={"url": f"file://{remote.bare}", "branch": "feature"})
    assert result.status == "completed", result.error
    (end,) = tool_ends(events, "station_session_info")
    info = json.loads(end.output)
    workspace = Path(result.workspace.path)
    assert info == {
        "sessionName": session, "workspaceName": f"info-{stack.engine}", "workspacePath": str(workspace),
        "gitBranch": "feature", "gitCommit": remote.commits["feature"], "messageCount": 0,
        "created": info["created"], "lastUsed": info["lastUsed"],
    }
    assert git("rev-parse", "HEAD", cwd=workspace).strip() == remote.commits["feature"]
    assert remote.commits["feature"] in result.result
    # Another session's record, and one that does not exist.
    events, result = await stack.run(f"session info {session}\nsession info nobody-{uuid.uuid4().hex[:6]}",
                                     workspace=f"info2-{stack.engine}")
    other, nobody = tool_ends(events, "station_session_info")
    assert json.loads(other.output)["sessionName"] == session
    assert json.loads(nobody.output) == {"error": "Session not found"}


@pytest.fixture
async def token_remote(tmp_path) -> AsyncIterator[tuple[str, str]]:
    """A git server over HTTP demanding a canary token; yields (repository URL, token)."""
    token = f"canary-{uuid.uuid4().hex}"
    repo = make_remote(tmp_path / "http", "project.git")
    server = GitHttpServer(repo.bare.parent, token)
    await server.start()
    yield f"{server.url}/project.git", token
    await server.stop()


async def test_credentials_are_refused_and_the_canaries_appear_nowhere(stack: Stack, token_remote, caplog):
    """Three ways a credential sits in the state bucket: under a key named like one (deny list),
    under a plain key a task reads its git token from (``tokenFromKV``), and as a token-shaped
    value under an innocent key. The agent gets an error for each; no canary reaches an event,
    the result, the session record or a log record."""
    caplog.set_level(logging.DEBUG)
    tokens = issued_tokens(stack.sidecar)
    url, git_token = token_remote
    named, shaped = f"canary-{uuid.uuid4().hex}", "ghp_" + uuid.uuid4().hex + "Canary0"
    await stack.state.put("deploy-token", named.encode())
    await stack.state.put("ci.publish", git_token.encode())
    await stack.state.put("release.note", f"publish with {shaped}".encode())
    seen: list[bytes] = []
    naming = stack.client.naming

    async def spy(msg) -> None:
        seen.append(msg.data)

    subs = [await stack.client.nc.subscribe(f"{prefix}.>", cb=spy) for prefix in (naming.stream_prefix,
                                                                                 naming.result_prefix)]
    session = f"canary-{stack.engine}"
    try:
        events, result = await stack.run(
            "kv get deploy-token\nkv get ci.publish\nkv get release.note\nkv set my.token x\n"
            f"kv set notes.copy {shaped}\nrun env", workspace=f"canary-{stack.engine}", session=session,
            git={"url": url, "tokenFromKV": "ci.publish"})
    finally:
        for sub in subs:
            await sub.unsubscribe()
    assert result.status == "completed", result.error
    gets, sets = tool_ends(events, "station_kv_get"), tool_ends(events, "station_kv_set")
    assert [t.error for t in gets + sets] == [True] * 5
    assert "may hold a credential" in gets[0].output and "may hold a credential" in gets[1].output
    assert "looks like it holds a credential" in gets[2].output and "may hold a credential" in sets[0].output
    assert "looks like it holds a credential" in sets[1].output
    assert await value_of(stack.state, "my.token") is None and await value_of(stack.state, "notes.copy") is None
    record = await stack.client.nc.jetstream().key_value(naming.sessions_bucket)
    stored = (await record.get(session)).value
    everything = b"\n".join([*seen, stored, result.model_dump_json().encode()])
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert len(seen) >= 8
    assert len(tokens) == 1 and "run env" in json.dumps([e.content for e in events if e.type == "prompt_sent"])
    for canary in (named, git_token, shaped, *tokens):
        assert canary.encode() not in everything and canary not in logs
    # Nothing of the tools' connection (its bearer token) was written into the workspace.
    files = [p for p in Path(result.workspace.path).rglob("*") if p.is_file()]
    assert files and not [p for p in files if tokens[0].encode() in p.read_bytes()]


async def test_private_keys_stay_with_their_session(stack: Stack):
    alpha, beta = f"alpha-{stack.engine}", f"beta-{stack.engine}"
    secret_note = f"alpha's own note {uuid.uuid4().hex[:6]}"
    _, result = await stack.run(f"kv set private.{alpha}.notes {secret_note}", session=alpha,
                                workspace=f"priv-a-{stack.engine}")
    assert result.status == "completed" and (await stack.state.get(f"private.{alpha}.notes")).value == \
        secret_note.encode()
    events, result = await stack.run(f"kv get private.{alpha}.notes\nkv set private.{alpha}.notes hijacked",
                                     session=beta, workspace=f"priv-b-{stack.engine}")
    read, write = tool_ends(events, "station_kv_get") + tool_ends(events, "station_kv_set")
    assert read.error and write.error and "private to another session" in read.output
    assert secret_note not in result.result
    events, result = await stack.run(f"kv get private.{alpha}.notes", session=alpha, workspace=f"priv-a-{stack.engine}")
    assert secret_note in result.result and (await stack.state.get(f"private.{alpha}.notes")).value == \
        secret_note.encode()


async def test_bad_arguments_get_error_results_and_nothing_breaks(stack: Stack):
    big = "x" * (70 * 1024)
    events, result = await stack.run(
        'kv get ../../etc/passwd\ntool station_kv_get {"key": 5}\ntool station_kv_set {"key": "only.key"}\n'
        'tool station_kv_get {"key": "plan", "bucket": "objects"}\ntool station_session_info {"sessionName": ""}\n'
        f"kv set big.value {big}",
        workspace=f"bad-{stack.engine}")
    assert result.status == "completed", result.error
    ends = [e.tool for e in events if e.type == "tool_end"]
    assert len(ends) == 6 and all(t.error for t in ends), [(t.name, t.output[:80]) for t in ends]
    assert "invalid key" in ends[0].output
    assert "at most" in ends[5].output
    assert await value_of(stack.state, "big.value") is None
    # The sidecar and the tools still serve.
    _, after = await stack.run("kv set after.bad ok", workspace=f"bad-{stack.engine}")
    assert after.status == "completed" and (await stack.state.get("after.bad")).value == b"ok"


@pytest.mark.parametrize("stack", ["opencode"], indirect=True)  # the CLI engines configure each process
async def test_opencode_tools_come_back_after_dispose_and_restart(stack: Stack):
    """OpenCode serve holds the tools' registration in a directory instance: after the instance
    is disposed, and after the server itself was killed and restarted, the next task has them."""
    engine = stack.sidecar.engine
    await stack.state.put("survive.value", b"still here")
    _, first = await stack.run("kv get survive.value", workspace="survive")
    assert "still here" in first.result
    assert await engine.api.dispose_instance(first.workspace.path)
    _, second = await stack.run("kv get survive.value", workspace="survive")
    assert "still here" in second.result, second.result
    generation = engine.process.generation
    os.kill(engine.process.pid, signal.SIGKILL)
    for _ in range(600):  # the supervisor restarts it (30 s at most)
        if engine.process.generation > generation and engine.healthy():
            break
        await asyncio.sleep(0.05)
    assert engine.process.generation > generation
    _, third = await stack.run("kv get survive.value", workspace="survive")
    assert third.status == "completed" and "still here" in third.result, third.result


@pytest.mark.parametrize("stack", ["opencode"], indirect=True)  # the only engine sharing a connection
async def test_opencode_sessions_sharing_a_workspace_cannot_use_private_keys(stack: Stack):
    """OpenCode serve has one tool connection per workspace directory: while two sessions run in
    the same one, a call cannot be told apart and private keys are refused, not guessed."""
    await stack.state.put("private.gamma.notes", b"gamma's")
    long = await stack.client.submit("slow 60", workspace="shared-ws", session="delta", timeout=120)
    async for event in long.events(timeout=60):
        if event.type == "text":
            break  # delta is inside its prompt: it holds the directory's tools
    try:
        events, _ = await stack.run("kv get private.gamma.notes\nkv get shared.plain",
                                         workspace="shared-ws", session="gamma")
        private, plain = tool_ends(events, "station_kv_get")
        assert private.error and "several sessions share this workspace" in private.output
        assert not plain.error
    finally:
        await long.cancel()
    assert (await long.result(timeout=30)).status == "cancelled"
    _, alone = await stack.run("kv get private.gamma.notes", workspace="shared-ws", session="gamma")
    assert "gamma's" in alone.result


async def test_sidecar_process_logs_never_show_the_tokens(nats_server, tmp_path, token_remote):
    """``ocbridge serve`` at DEBUG: the tools' bearer tokens and a credential the agent asked for
    appear in none of its log lines."""
    url, git_token = token_remote
    naming = unique_naming()
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({
        "nats": {"url": nats_server.url}, "naming": naming.model_dump(), "log_level": "DEBUG",
        "workspace_root": str(tmp_path / "workspaces"), "data_dir": str(tmp_path / "data"),
        "offline_model": True, "git": {"allowed_schemes": ["http"]},
    }))
    sidecar = SidecarProcess(config, tmp_path / "sidecar.log")
    await sidecar.start()
    try:
        async with await CodingClient.connect(nats_server.url, naming=naming) as client:
            state = await client.nc.jetstream().key_value(naming.state_bucket)
            await state.put("ci.publish", git_token.encode())
            result = await client.run("kv get ci.publish\nrun env\nkv set seen ok", workspace="logs",
                                      git={"url": url, "tokenFromKV": "ci.publish"}, wait=120)
            assert result.status == "completed", result.error
            assert (await state.get("seen")).value == b"ok"
    finally:
        await sidecar.stop()
    log = (tmp_path / "sidecar.log").read_text(errors="replace")
    assert "agent tools (MCP) at http://127.0.0.1:" in log and "station_kv_get refused" in log
    assert git_token not in log
    assert all(value == "***" for value in re.findall(r"Bearer\s+(\S{0,3})", log))
