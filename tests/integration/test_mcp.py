"""``ocbridge mcp`` driven by a real MCP client session (the ``mcp`` package's stdio client): the six
tools are listed with their schemas, and Station's scenario runs through ``tools/call`` against a
sidecar on NATS, ending with the commit in the remote repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from mcp import ClientSession, StdioServerParameters, stdio_client
from test_backends_scenario import TOKEN, TOKEN_VAR, station_block

from ocbridge.bridge.sidecar import Sidecar
from ocbridge.client.station.tools import TOOL_DESCRIPTIONS, TOOL_NAMES, TOOL_SCHEMAS
from support.gitserver import GitHttpServer, Remote, git, make_remote
from support.stack import OCBRIDGE, require_tools, sidecar_config, unique_naming

pytestmark = pytest.mark.slow


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OCBRIDGE_", "STN_"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Remote:
    return make_remote(tmp_path_factory.mktemp("mcp-remotes"))


@pytest.fixture(scope="module")
async def git_server(remote) -> AsyncIterator[GitHttpServer]:
    server = GitHttpServer(remote.bare.parent, TOKEN)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def config_file(nats_server, tmp_path_factory) -> AsyncIterator[str]:
    """A Station config.yaml for the opencode-nats backend, with a sidecar serving it."""
    require_tools()
    tmp = tmp_path_factory.mktemp("mcp")
    naming = unique_naming()
    sidecar = Sidecar(sidecar_config(nats_server.url, tmp / "sidecar", naming, git={
        "allowed_schemes": ["http"], "user_name": "Station Bot", "user_email": "bot@example.com"}))
    await sidecar.start()
    path = tmp / "config.yaml"
    whole = {"ai_provider": "openai",
             "coding": station_block("opencode-nats", tmp, nats_url=nats_server.url, naming=naming)}
    path.write_text(yaml.safe_dump(whole))
    yield str(path)
    await sidecar.stop(grace=5)


def output(result: Any) -> dict[str, Any]:
    """A tool's output: the JSON text, which must equal the structured content."""
    assert result.is_error is False, result.content[0].text
    data = json.loads(result.content[0].text)
    assert result.structured_content == data
    return data


async def test_mcp_client_lists_tools_and_runs_the_scenario(config_file, remote, git_server):
    params = StdioServerParameters(command=OCBRIDGE, args=["mcp", "--config", config_file],
                                   env=clean_env(**{TOKEN_VAR: TOKEN}))
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        listed = (await session.list_tools()).tools
        assert [t.name for t in listed] == list(TOOL_NAMES)
        for tool in listed:
            assert tool.input_schema == TOOL_SCHEMAS[tool.name]
            assert tool.description == TOOL_DESCRIPTIONS[tool.name]

        title = f"MCP greeting {uuid.uuid4().hex[:6]}"
        opened = output(await session.call_tool("coding_open", {
            "repo_url": f"{git_server.url}/project.git", "title": title}))
        assert opened["repo_cloned"] is True and opened["managed"] is True
        sid = opened["session_id"]
        branch = output(await session.call_tool("coding_branch", {"session_id": sid, "branch": "mcp/hello"}))
        assert (branch["success"], branch["created"], branch["previous_branch"]) == (True, True, "trunk")
        code = output(await session.call_tool("code", {"session_id": sid,
                                                       "instruction": "create hello.txt with content hi"}))
        assert code["success"] is True
        assert code["files_changed"] == [{"path": "hello.txt", "action": "created", "lines_added": 1,
                                          "lines_removed": 0}]
        assert code["trace"]["tool_calls"] and code["tokens_used"] > 0
        commit = output(await session.call_tool("coding_commit", {"session_id": sid, "message": "add hello"}))
        assert commit["success"] is True and len(commit["commit_hash"]) == 40
        push = output(await session.call_tool("coding_push", {"session_id": sid, "set_upstream": True}))
        assert (push["success"], push["branch"]) == (True, "mcp/hello")
        assert git(f"--git-dir={remote.bare}", "rev-parse", "mcp/hello").strip() == commit["commit_hash"]
        assert git(f"--git-dir={remote.bare}", "show", "mcp/hello:hello.txt").strip() == "hi"

        # Continuing the session by part of its title, through MCP too.
        again = output(await session.call_tool("coding_open", {"existing_session_id": title[-6:].upper()}))
        assert again["session_id"] == sid
        recall = output(await session.call_tool("code", {"session_id": sid, "instruction": "recall"}))
        assert "create hello.txt with content hi" in recall["summary"]

        closed = output(await session.call_tool("coding_close", {"session_id": sid}))
        assert closed == {"ok": True, "cleaned_up": True}  # committed: nothing left to report

        # Tool errors are MCP tool errors whose text says what is wrong.
        bad = await session.call_tool("code", {"session_id": sid})
        assert bad.is_error is True
        assert bad.content[0].text == "code: invalid arguments: instruction: Field required"
        failed = await session.call_tool("coding_open", {"existing_session_id": "ses_doesnotexist"})
        assert failed.is_error is True and "no session has the ID 'ses_doesnotexist'" in failed.content[0].text
        # Failed work is a normal result with success false.
        gone = output(await session.call_tool("coding_commit", {"session_id": sid, "message": "x"}))
        assert gone["success"] is False and "is closed" in gone["error"]


def test_mcp_refuses_an_invalid_config_naming_the_key(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("coding:\n  backend: opencode-nats\n  nats:\n    subjects:\n      taks: x\n")
    proc = subprocess.run([OCBRIDGE, "mcp", "--config", str(path)], capture_output=True, text=True,
                          env=clean_env(), timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 2
    assert "coding.nats.subjects.taks: unknown key (typo?)" in proc.stderr
    assert proc.stdout == ""  # stdout is the MCP wire: nothing else may appear there


def test_mcp_subcommand_is_registered():
    proc = subprocess.run([sys.executable, "-m", "ocbridge.client.cli", "mcp", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "--config" in proc.stdout
