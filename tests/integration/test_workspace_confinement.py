"""A task can only touch what is its own, on disk: the whole pipeline and the workspace operations
(in-process, scripted engine) against real folders, symlinks and git repositories.

Each test plants something hostile (a symlink under the root leading out, a link left in a workspace
by the agent or committed in a cloned repository, a session record naming a foreign folder, a
janitor record with keys this sidecar does not know, a token in the state bucket asked for by a
URL of the task's choosing) and checks two things: nothing outside the workspace root was read or
written, and what the user sees is an error that says what was refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ocbridge.bridge.config import load_config
from ocbridge.bridge.engines.base import PromptRequest
from ocbridge.bridge.engines.scripted import ScriptedEngine, WriteFile
from ocbridge.bridge.inprocess.runner import LocalRunner
from ocbridge.bridge.redact import Redactor
from ocbridge.bridge.storage.stores import FolderKeyValue
from ocbridge.client.protocol import GitOpRequest, SessionState, Task, TaskResult, iso_now
from support.gitserver import GitHttpServer, git, make_remote

CANARY = "ghp_KvCanaryToken0123456789abcdefghijkl"


def snapshot(folder: Path) -> dict[str, bytes | str | None]:
    """Every entry under ``folder``: file contents, link targets, ``None`` for folders (links are not
    followed). Equal snapshots before and after mean nothing there was written."""
    entries: dict[str, bytes | str | None] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            entries[rel] = os.readlink(path)
        elif path.is_dir():
            entries[rel] = None
        else:
            entries[rel] = path.read_bytes()
    return entries


@pytest.fixture
def outside(tmp_path) -> Path:
    """Stands for the rest of the machine: a home with an ssh folder and a git repository."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA owner\n")
    repo = home / "project"
    git("init", "-q", "-b", "main", str(repo))
    (repo / "code.py").write_text("print('mine')\n")
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "owner's work", cwd=repo)
    (repo / "code.py").write_text("print('uncommitted, mine')\n")
    return home


def make_config(tmp_path: Path, **git_settings):
    return load_config(
        overrides={
            "workspace_root": str(tmp_path / "workspaces"),
            "data_dir": str(tmp_path / "data"),
            "git": {"allow_file_urls": True, "allowed_schemes": ["https", "http"], **git_settings},
        },
        environ={},
    )


def make_task(task_id: str, *, workspace: str, session: str = "s1", files: list[str] | None = None,
              git_spec: dict | None = None, cleanup: str | None = None) -> Task:
    spec: dict = {"name": workspace}
    if git_spec is not None:
        spec["git"] = git_spec
    if cleanup is not None:
        spec["cleanup"] = cleanup
    return Task.model_validate({
        "taskID": task_id,
        "session": {"name": session},
        "workspace": spec,
        "prompt": "work",
        "files": files,
        "callback": {"streamSubject": f"stream.{task_id}", "resultSubject": f"result.{task_id}"},
    })


def stage(tmp_path: Path, task_id: str, name: str, data: bytes) -> None:
    """Put an input file where the in-process object store keeps it (``input/<taskID>/<name>``)."""
    target = tmp_path / "data" / "files" / "input" / task_id / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def op(**fields) -> GitOpRequest:
    return GitOpRequest.model_validate(fields)


def root_of(runner: LocalRunner) -> Path:
    return Path(runner.config.workspace_root).resolve()


def assert_refused(result: TaskResult, error_type: str, *needles: str) -> None:
    assert result.status == "error", result
    assert result.error_type == error_type, result.error
    for needle in needles:
        assert needle in (result.error or ""), result.error


# ------------------------------------------------------------------------------ workspace names


async def test_a_workspace_name_through_a_symlink_under_the_root_is_refused(tmp_path, outside):
    engine = ScriptedEngine([WriteFile("pwned.txt", "x")])
    before = snapshot(outside)
    async with LocalRunner(make_config(tmp_path), engine=engine, redactor=Redactor()) as runner:
        root = root_of(runner)
        root.mkdir(parents=True, exist_ok=True)
        os.symlink(outside, root / "shared")
        for n, name in enumerate(["shared", "shared/.ssh", "shared/new-ws", str(root / "shared" / "project")]):
            result = await runner.run(make_task(f"t{n}", workspace=name))
            assert_refused(result, "invalid_task", "outside the workspace root")
        opened = await runner.op(op(op="open", session="s-open", workspace="shared/new-ws"))
        assert not opened.ok and opened.error_type == "invalid_task" and "outside the workspace root" in opened.error
        status = await runner.op(op(op="status", workspace="shared/project"))
        assert not status.ok and "outside the workspace root" in status.error
    assert engine.requests == []  # the agent never ran
    assert snapshot(outside) == before


# ----------------------------------------------------------------------------------- input files


async def test_an_input_file_through_a_link_the_agent_left_is_refused(tmp_path, outside):
    def script(request: PromptRequest):
        # The first prompt plants links in its own workspace: a folder and a file pointing out.
        if not (request.directory / "docs").is_symlink():
            os.symlink(outside / ".ssh", request.directory / "docs")
            os.symlink(outside / ".ssh" / "authorized_keys", request.directory / "keys.txt")
        return ["done"]

    engine = ScriptedEngine(script)
    async with LocalRunner(make_config(tmp_path), engine=engine, redactor=Redactor()) as runner:
        assert (await runner.run(make_task("t1", workspace="ws"))).ok
        before = snapshot(outside)
        stage(tmp_path, "t2", "docs/authorized_keys", b"ssh-ed25519 AAAA attacker\n")
        result = await runner.run(make_task("t2", workspace="ws", files=["docs/authorized_keys"]))
        assert_refused(result, "invalid_task", "docs/authorized_keys", "symbolic link 'docs'")
        stage(tmp_path, "t3", "keys.txt", b"attacker\n")
        result = await runner.run(make_task("t3", workspace="ws", files=["keys.txt"]))
        assert_refused(result, "invalid_task", "keys.txt", "symbolic link")
        stage(tmp_path, "t4", ".git/config", b"[core]\n\tfsmonitor = touch /tmp/pwned\n")
        result = await runner.run(make_task("t4", workspace="ws", files=[".git/config"]))
        assert_refused(result, "invalid_task", "'.git'")
        stage(tmp_path, "t5", "notes/plan.md", b"the plan\n")
        placed = await runner.run(make_task("t5", workspace="ws", files=["notes/plan.md"]))
        assert placed.ok and (root_of(runner) / "ws" / "notes" / "plan.md").read_bytes() == b"the plan\n"
    assert len(engine.requests) == 2  # refused tasks never reached the agent
    assert snapshot(outside) == before


async def test_an_input_file_through_a_link_in_a_cloned_repository_is_refused(tmp_path, outside):
    remote = make_remote(tmp_path / "remotes")
    os.symlink(outside / ".ssh", remote.seed / "docs")  # committed in the repository itself
    remote.commit({}, "add a docs link")
    before = snapshot(outside)
    engine = ScriptedEngine(["done"])
    async with LocalRunner(make_config(tmp_path), engine=engine, redactor=Redactor()) as runner:
        stage(tmp_path, "t1", "docs/authorized_keys", b"ssh-ed25519 AAAA attacker\n")
        result = await runner.run(make_task("t1", workspace="clone", files=["docs/authorized_keys"],
                                            git_spec={"url": str(remote.bare)}))
        assert_refused(result, "invalid_task", "symbolic link 'docs'")
        assert (root_of(runner) / "clone" / "docs").is_symlink()  # the clone happened, the write did not
    assert engine.requests == []
    assert snapshot(outside) == before


# ------------------------------------------------------------------------ stored workspace paths


def session_record(name: str, path: str) -> SessionState:
    return SessionState(sessionName=name, opencodeID="ses_foreign", workspaceName=name, workspacePath=path,
                        created=iso_now(), lastUsed=iso_now())


@pytest.mark.parametrize("how", ["foreign path", "symlink under the root", "dot-dot"])
async def test_a_corrupt_workspace_path_in_a_session_record_is_never_acted_on(tmp_path, outside, how):
    repo = outside / "project"
    head = git("rev-parse", "HEAD", cwd=repo)
    async with LocalRunner(make_config(tmp_path), engine=ScriptedEngine(["done"]), redactor=Redactor()) as runner:
        root = root_of(runner)
        root.mkdir(parents=True, exist_ok=True)
        stored = {"foreign path": str(repo),
                  "symlink under the root": str(root / "link"),
                  "dot-dot": f"{root}/../home/project"}[how]
        if how == "symlink under the root":
            os.symlink(repo, root / "link")
        await runner.runtime.sessions.put(session_record("victim", stored))
        # A janitor record that would have the folder deleted when the session closes.
        await runner.runtime.janitor.touch(Path(stored), policy="on_session_end")
        before = snapshot(outside)
        for request in (
            op(op="commit", session="victim", message="take it"),
            op(op="status", session="victim"),
            op(op="diff", session="victim"),
            op(op="branch", session="victim", branch="evil"),
            op(op="push", session="victim"),
            op(op="close", session="victim", success=True),
        ):
            result = await runner.op(request)
            assert not result.ok, (request.op, result)
            assert result.error_type == "workspace_error", result.error
            assert "session 'victim'" in result.error and "outside the workspace root" in result.error
            assert "open the session again" in result.error
        assert (await runner.runtime.sessions.get("victim")).closed is None  # not even marked closed
    assert snapshot(outside) == before
    assert git("rev-parse", "HEAD", cwd=repo) == head
    assert git("branch", "--list", "evil", cwd=repo) == ""


async def test_a_confined_session_record_still_works(tmp_path):
    remote = make_remote(tmp_path / "remotes")
    async with LocalRunner(make_config(tmp_path), engine=ScriptedEngine(["done"]), redactor=Redactor()) as runner:
        opened = await runner.op(op(op="open", session="mine", workspace="mine-ws",
                                    git={"url": str(remote.bare)}, cleanup="on_session_end"))
        assert opened.ok, opened.error
        (Path(opened.workspace_path) / "new.txt").write_text("new\n")
        committed = await runner.op(op(op="commit", session="mine", message="add new"))
        assert committed.ok and committed.files_changed == 1, committed.error
        assert (await runner.op(op(op="status", session="mine"))).dirty is False
        closed = await runner.op(op(op="close", session="mine"))
        assert closed.ok and closed.cleaned_up and not Path(opened.workspace_path).exists()


async def test_a_foreign_record_is_not_continued_by_a_new_task(tmp_path, outside):
    engine = ScriptedEngine(["done"])
    async with LocalRunner(make_config(tmp_path), engine=engine, redactor=Redactor()) as runner:
        await runner.runtime.sessions.put(session_record("s1", str(outside / "project")))
        result = await runner.run(make_task("t1", workspace="ws", session="s1"))
        assert result.ok, result.error
        state = await runner.runtime.sessions.get("s1")
        assert state.workspace_path == str(root_of(runner) / "ws") and state.opencode_id != "ses_foreign"
    assert engine.requests[0].directory == root_of(runner) / "ws"


# ------------------------------------------------------------------------------ janitor records


async def test_a_janitor_record_with_a_foreign_key_does_not_fail_the_workspace(tmp_path):
    async with LocalRunner(make_config(tmp_path), engine=ScriptedEngine(["done"]), redactor=Redactor()) as runner:
        ws = root_of(runner) / "ws"
        ws.mkdir(parents=True)
        await FolderKeyValue(tmp_path / "data" / "state").put(f"ocbridge.workspace.{ws}",
                        b'{"path": "%s", "policy": "on_success", "scope": "agent", "last_used": 1.0, '
                        b'"owner": "station", "ttl": 3600}' % str(ws).encode())
        result = await runner.run(make_task("t1", workspace="ws"))
        assert result.ok, result.error
        assert not ws.exists()  # its on_success policy was read and applied


# ------------------------------------------------------------------------------------ KV tokens


@pytest.fixture
async def http_server(tmp_path):
    remote = make_remote(tmp_path / "http", "project.git")
    server = GitHttpServer(remote.bare.parent, CANARY)
    await server.start()
    yield server, f"{server.url}/project.git"
    await server.stop()


async def test_a_kv_token_goes_only_to_token_hosts(tmp_path, http_server):
    server, url = http_server
    config = make_config(tmp_path, token_hosts=["git.example.com"])
    async with LocalRunner(config, engine=ScriptedEngine(["done"]), redactor=Redactor()) as runner:
        await FolderKeyValue(tmp_path / "data" / "state").put("deploy-token", CANARY.encode())
        spec = {"url": url, "tokenFromKV": "deploy-token"}
        result = await runner.run(make_task("t1", workspace="kv-clone", git_spec=spec))
        assert_refused(result, "invalid_task", "tokenFromKV 'deploy-token' refused", server.url,
                       "git.token_hosts (git.example.com)")
        assert CANARY not in result.model_dump_json()
        assert server.auth_seen == []  # refused before git ran: the server never heard of it
        assert not (root_of(runner) / "kv-clone" / ".git").exists()

        # A push to a remote of the task's choosing (set in the workspace) is held to the same rule.
        remote = make_remote(tmp_path / "local")
        opened = await runner.op(op(op="open", session="p", workspace="push-ws", git={"url": str(remote.bare)}))
        assert opened.ok, opened.error
        git("remote", "add", "exfil", url, cwd=opened.workspace_path)
        pushed = await runner.op(op(op="push", session="p", remote="exfil", tokenFromKV="deploy-token"))
        assert not pushed.ok and pushed.error_type == "invalid_task" and "git.token_hosts" in pushed.error
        assert CANARY not in pushed.model_dump_json() and server.auth_seen == []


async def test_a_kv_token_is_used_for_a_host_in_token_hosts(tmp_path, http_server):
    server, url = http_server
    host = url.split("/")[2]
    config = make_config(tmp_path, token_hosts=[host])
    async with LocalRunner(config, engine=ScriptedEngine(["done"]), redactor=Redactor()) as runner:
        await FolderKeyValue(tmp_path / "data" / "state").put("deploy-token", CANARY.encode())
        spec = {"url": url, "tokenFromKV": "deploy-token"}
        result = await runner.run(make_task("t1", workspace="kv-clone", git_spec=spec))
        assert result.ok, result.error
        assert (root_of(runner) / "kv-clone" / ".git").is_dir() and server.auth_seen
        missing = await runner.run(make_task("t2", workspace="kv-2", git_spec={"url": url, "tokenFromKV": "nope"}))
        assert_refused(missing, "git_error", "no key 'nope'")
