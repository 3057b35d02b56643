"""The same Station scenario on all four backends, through the coding tools: clone a repository that
needs a token, branch, ask the agent for a file, commit, push to the remote, close; then continue
the session by part of its title and by its engine session ID. Same result shape everywhere, real
commit hashes, files really in the remote.

``opencode-nats`` runs a real sidecar (in this process) on an embedded nats-server; the other three
run the pipeline in-process. All four use the offline scripted model."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ocbridge.bridge.sidecar import Sidecar
from ocbridge.client.protocol import Naming
from ocbridge.client.station.config import load_station_config
from ocbridge.client.station.tools import CodingTools, tools_from_config
from support.gitserver import GitHttpServer, Remote, git, make_remote
from support.stack import require_tools, sidecar_config, unique_naming

pytestmark = pytest.mark.slow

BACKENDS = ["opencode-nats", "opencode", "opencode-cli", "claudecode"]
TOKEN = "scenario-token-5f2a9c"
TOKEN_VAR = "SCENARIO_GIT_TOKEN"

#: Output keys every backend returns for the scenario's calls (Station's names, nothing else).
SHAPES = {
    "coding_open": {"session_id", "workspace_path", "workspace_id", "repo_cloned", "managed"},
    "coding_branch": {"success", "branch", "created", "switched_to", "previous_branch"},
    "code": {"success", "summary", "files_changed", "tokens_used", "cost", "trace"},
    "trace": {"session_id", "tokens", "cost", "duration_ms", "tool_calls", "reasoning", "text"},
    "coding_commit": {"success", "commit_hash", "message", "files_changed", "insertions", "deletions"},
    "coding_push": {"success", "remote", "branch", "message"},
    "coding_close": {"ok", "files_changed", "cleaned_up"},
}


def station_block(backend: str, tmp: Path, *, nats_url: str | None = None,
                  naming: Naming | None = None) -> dict[str, Any]:
    """A Station ``coding:`` block for ``backend``: token from the environment, offline model, and
    plain-HTTP git allowed (the test's git server is on loopback)."""
    block: dict[str, Any] = {
        "backend": backend,
        "task_timeout_min": 2,
        "workspace_base_path": str(tmp / "workspaces"),
        "cleanup_policy": "on_session_end",
        "git": {"token": "${" + TOKEN_VAR + "}", "user_name": "Station Bot", "user_email": "bot@example.com"},
        "bridge": {"data_dir": str(tmp / "data"), "offline_model": True,
                   "git": {"allowed_schemes": ["http"]}},
    }
    if naming is not None:
        block["nats"] = {
            "url": nats_url,
            "subjects": {"task": naming.task_subject, "stream": naming.stream_prefix, "result": naming.result_prefix},
            "kv": {"sessions": naming.sessions_bucket, "state": naming.state_bucket},
            "object_store": naming.object_store,
        }
        block["bridge"]["naming"] = {"tasks_bucket": naming.tasks_bucket, "stream_name": naming.stream_name,
                                     "dead_letter_stream": naming.dead_letter_stream,
                                     "consumer_name": naming.consumer_name}
    return block


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Remote:
    return make_remote(tmp_path_factory.mktemp("scenario-remotes"))


@pytest.fixture(scope="module")
async def git_server(remote) -> AsyncIterator[GitHttpServer]:
    server = GitHttpServer(remote.bare.parent, TOKEN)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module", params=BACKENDS)
async def tools(request, nats_server, tmp_path_factory) -> AsyncIterator[CodingTools]:
    """Started tools on one backend (and, for opencode-nats, the sidecar behind it)."""
    require_tools()
    backend = request.param
    tmp = tmp_path_factory.mktemp(backend)
    sidecar = None
    if backend == "opencode-nats":
        naming = unique_naming()
        # A sidecar commits with its own identity (the protocol carries no author): deployed
        # next to Station, it is configured with Station's.
        sidecar = Sidecar(sidecar_config(nats_server.url, tmp / "sidecar", naming, git={
            "allowed_schemes": ["http"], "user_name": "Station Bot", "user_email": "bot@example.com"}))
        await sidecar.start()
        block = station_block(backend, tmp, nats_url=nats_server.url, naming=naming)
    else:
        block = station_block(backend, tmp)
    environ = {TOKEN_VAR: TOKEN}
    tools = tools_from_config(load_station_config({"coding": block}, environ), environ)
    await tools.start()
    yield tools
    await tools.aclose()
    if sidecar is not None:
        await sidecar.stop(grace=5)


def shape(name: str, output: dict[str, Any]) -> None:
    assert set(output) == SHAPES[name], f"{name} returned {sorted(output)}"


async def test_open_branch_code_commit_push_close(tools, remote, git_server):
    backend = tools.backend.name
    title = f"Greeting work on {backend} {uuid.uuid4().hex[:6]}"
    opened = await tools.coding_open({"repo_url": f"{git_server.url}/project.git", "title": title})
    shape("coding_open", opened)
    assert opened["repo_cloned"] is True and opened["managed"] is True
    workspace = Path(opened["workspace_path"])
    assert (workspace / "README.md").read_text() == "# project\n"
    session = opened["session_id"]

    # One branch per backend: they all push to the same remote.
    topic = f"topic/{backend}"
    branch = await tools.coding_branch({"session_id": session, "branch": topic})
    shape("coding_branch", branch)
    assert branch == {"success": True, "branch": topic, "created": True, "switched_to": True,
                      "previous_branch": "trunk"}

    code = await tools.code({"session_id": session, "instruction": "create hello.txt with content hi"})
    shape("code", code)
    shape("trace", code["trace"])
    assert code["success"] is True, code
    assert code["files_changed"] == [{"path": "hello.txt", "action": "created", "lines_added": 1,
                                      "lines_removed": 0}]
    assert code["tokens_used"] > 0 and code["summary"]
    calls = code["trace"]["tool_calls"]
    assert any("hello.txt" in str(call.get("input")) and call.get("duration_ms") is not None for call in calls)
    assert (workspace / "hello.txt").read_text().strip() == "hi"

    commit = await tools.coding_commit({"session_id": session, "message": "add hello"})
    shape("coding_commit", commit)
    assert commit["success"] is True and re.fullmatch(r"[0-9a-f]{40}", commit["commit_hash"])
    assert (commit["files_changed"], commit["insertions"], commit["deletions"]) == (1, 1, 0)
    assert git("rev-parse", "HEAD", cwd=workspace).strip() == commit["commit_hash"]

    push = await tools.coding_push({"session_id": session, "set_upstream": True})
    shape("coding_push", push)
    assert (push["success"], push["remote"], push["branch"]) == (True, "origin", topic)

    # The commit, with the agent's file, is in the remote repository.
    assert git(f"--git-dir={remote.bare}", "rev-parse", topic).strip() == commit["commit_hash"]
    assert git(f"--git-dir={remote.bare}", "show", f"{topic}:hello.txt").strip() == "hi"
    assert git(f"--git-dir={remote.bare}", "log", "-1", "--format=%an|%s", topic).strip() == \
        "Station Bot|add hello"
    # The token never landed in the clone.
    assert TOKEN not in (workspace / ".git" / "config").read_text()

    closed = await tools.coding_close({"session_id": session})
    assert closed["ok"] is True and closed["cleaned_up"] is True  # cleanup_policy: on_session_end
    assert not workspace.exists()
    assert set(closed) <= SHAPES["coding_close"]


async def test_continue_by_title_fragment_and_by_id(tools):
    backend = tools.backend.name
    marker = uuid.uuid4().hex[:6]
    opened = await tools.coding_open({"title": f"Payments refactor {marker} on {backend}"})
    session = opened["session_id"]
    first = await tools.code({"session_id": session, "instruction": f"create notes-{marker}.txt with content x"})
    assert first["success"] is True, first
    engine_id = first["trace"]["session_id"]
    assert engine_id

    again = await tools.coding_open({"existing_session_id": f"REFACTOR {marker}"})
    assert again["session_id"] == session and again["workspace_path"] == opened["workspace_path"]
    recall = await tools.code({"session_id": session, "instruction": "recall"})
    assert recall["success"] is True
    assert f"create notes-{marker}.txt with content x" in recall["summary"]
    assert recall["trace"]["session_id"] == engine_id  # the same engine session, continued

    by_id = await tools.coding_open({"existing_session_id": engine_id})
    assert by_id["session_id"] == session
    recall = await tools.code({"session_id": session, "instruction": "recall"})
    assert f"create notes-{marker}.txt with content x" in recall["summary"]
    assert (await tools.coding_close({"session_id": session}))["ok"] is True


async def test_continue_after_close(tools):
    marker = uuid.uuid4().hex[:6]
    opened = await tools.coding_open({"title": f"Invoice export {marker}"})
    first = await tools.code({"session_id": opened["session_id"],
                              "instruction": f"create inv-{marker}.txt with content y"})
    assert first["success"] is True
    assert (await tools.coding_close({"session_id": opened["session_id"]}))["ok"] is True
    again = await tools.coding_open({"existing_session_id": f"invoice EXPORT {marker}"})
    recall = await tools.code({"session_id": again["session_id"], "instruction": "recall"})
    assert f"create inv-{marker}.txt with content y" in recall["summary"]
