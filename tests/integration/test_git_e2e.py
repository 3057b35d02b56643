"""Git workspaces through the sidecar: clone/pull/checkout events, changes and patch, operations,
token sources, secrets that never leak, malicious inputs, cleanup policies."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from nats.js.errors import KeyNotFoundError

from ocbridge.bridge.sidecar import Sidecar
from ocbridge.client.client import CodingClient
from ocbridge.client.kv import list_keys
from support.gitserver import GitHttpServer, git, make_remote
from support.stack import SidecarProcess, sidecar_config, unique_naming

pytestmark = [pytest.mark.opencode, pytest.mark.slow]

CANARY = "ghp_CanaryToken0123456789abcdefghijklmnop"


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    return make_remote(tmp_path_factory.mktemp("remotes"))


@pytest.fixture(scope="module")
async def git_stack(nats_server, tmp_path_factory, remote):
    tmp = tmp_path_factory.mktemp("git-stack")
    naming = unique_naming()
    git = {"allow_file_urls": True, "allowed_schemes": ["https", "http"], "user_name": "Bridge Bot",
           "user_email": "bot@example.com"}
    config = sidecar_config(nats_server.url, tmp, naming, git=git)
    sidecar = Sidecar(config)
    await sidecar.start()
    client = await CodingClient.connect(nats_server.url, naming=naming)
    yield sidecar, client
    await client.close()
    await sidecar.stop(grace=5)


def root_of(sidecar) -> Path:
    return Path(sidecar.config.workspace_root).resolve()


async def run_collecting(client, prompt, **kwargs):
    handle = await client.submit(prompt, **kwargs)
    events = [e async for e in handle.events(timeout=90)]
    return events, await handle.result(timeout=10)


async def test_clone_events_changes_and_patch_match_git(git_stack, remote):
    sidecar, client = git_stack
    url = f"file://{remote.bare}"
    events, result = await run_collecting(
        client,
        "create notes/new.txt with content hello\nedit src/app.py replace return 2 with return 3\ndelete README.md",
        workspace="clone-ws", session="clone-s", git={"url": url},
    )
    assert result.status == "completed", result.error
    types = [e.type for e in events]
    assert types[:4] == ["workspace_created", "git_clone", "session_created", "prompt_sent"]
    clone = events[1].git
    assert clone.branch == "trunk" and clone.commit == remote.commits["second"] and clone.url == url

    path = root_of(sidecar) / "clone-ws"
    assert result.workspace.git.branch == "trunk"
    assert result.workspace.git.commit == remote.commits["second"]
    assert result.workspace.git.dirty is True
    changes = {c.path: c for c in result.changes}
    assert set(changes) == {"notes/new.txt", "src/app.py", "README.md"}
    assert changes["notes/new.txt"].status == "added" and changes["notes/new.txt"].insertions == 1
    assert changes["src/app.py"].status == "modified"
    assert (changes["src/app.py"].insertions, changes["src/app.py"].deletions) == (1, 1)
    assert changes["README.md"].status == "deleted"

    # The stored patch is git's own diff of the task's changes.
    git("add", "-A", cwd=path)
    expected = git("diff", "--cached", "-M", remote.commits["second"], cwd=path)
    git("reset", "-q", cwd=path)
    assert result.patch == f"output/{result.task_id}/changes.patch"
    assert (await client.artifact(result.patch)).decode() == expected
    state = await client.get_session("clone-s")
    assert state.git.url == url and state.git.branch == "trunk"


async def test_reuse_pulls_new_upstream_commits_and_checks_out_refs(git_stack, remote, tmp_path):
    _, client = git_stack
    url = f"file://{remote.bare}"
    first = await client.run("hello", workspace="pull-ws", session="pull-s", git={"url": url}, wait=90)
    assert first.workspace.git.commit == remote.commits["second"]
    upstream = remote.commit({"later.txt": "later\n"}, "later")
    events, second = await run_collecting(client, "read later.txt", workspace="pull-ws", session="pull-s",
                                          git={"url": url})
    assert second.status == "completed"
    pull = next(e for e in events if e.type == "git_pull")
    assert pull.git.commit == upstream and second.workspace.git.commit == upstream
    assert "later" in second.result

    events, tagged = await run_collecting(client, "hello", workspace="tag-ws", session="tag-s",
                                          git={"url": url, "ref": "v1"})
    assert tagged.workspace.git.commit == remote.commits["first"]
    assert "git_checkout" in [e.type for e in events]
    feature = await client.run("hello", workspace="feat-ws", session="feat-s",
                               git={"url": url, "branch": "feature"}, wait=90)
    assert feature.workspace.git.branch == "feature" and feature.workspace.git.commit == remote.commits["feature"]


async def test_origin_mismatch_is_a_clear_error_and_nothing_is_touched(git_stack, remote, tmp_path):
    sidecar, client = git_stack
    other = make_remote(tmp_path / "other", "other.git")
    await client.run("hello", workspace="mismatch-ws", session="m1", git={"url": f"file://{remote.bare}"}, wait=90)
    config_before = (root_of(sidecar) / "mismatch-ws/.git/config").read_bytes()
    result = await client.run("hello", workspace="mismatch-ws", session="m2", git={"url": f"file://{other.bare}"},
                              wait=90)
    assert result.status == "error" and result.error_type == "workspace_error"
    assert "origin" in result.error
    assert (root_of(sidecar) / "mismatch-ws/.git/config").read_bytes() == config_before


async def test_non_git_workspace_reports_only_what_the_task_touched(git_stack):
    sidecar, client = git_stack
    folder = root_of(sidecar) / "plain-ws"
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("same\n")
    (folder / "change.txt").write_text("one\n")
    result = await client.run("edit change.txt replace one with two\ncreate added.txt with content a",
                              workspace="plain-ws", session="plain-s", wait=90)
    assert result.status == "completed"
    assert {(c.path, c.status) for c in result.changes} == {("change.txt", "modified"), ("added.txt", "added")}
    assert result.workspace.git is None


async def test_input_files_are_placed_before_the_prompt(git_stack):
    _, client = git_stack
    task = client.build_task("read data/input.json", workspace="input-ws", session="input-s")
    task.files = ["data/input.json"]
    await client.stage_file(task.task_id, "data/input.json", b'{"answer": 42}')
    result = await client.run(task, wait=90)
    assert result.status == "completed" and '"answer": 42' in result.result


async def test_branch_commit_push_operations_return_git_facts(git_stack, remote):
    sidecar, client = git_stack
    url = f"file://{remote.bare}"
    opened = await client.op({"op": "open", "session": "ops-s", "workspace": "ops-ws", "git": {"url": url},
                              "title": "Ops feature"})
    assert opened.ok and opened.repo_cloned and opened.workspace_path.endswith("ops-ws")
    assert opened.opencode_id.startswith("ses_")
    branch = await client.op({"op": "branch", "session": "ops-s", "branch": "topic/ops"})
    assert branch.ok and branch.previous_branch == "trunk" and branch.created
    done = await client.run("create ops.txt with content from ops", workspace="ops-ws", session="ops-s", wait=90)
    assert done.status == "completed" and done.session.opencode_id == opened.opencode_id
    commit = await client.op({"op": "commit", "session": "ops-s", "message": "Add ops.txt"})
    path = root_of(sidecar) / "ops-ws"
    assert commit.ok and commit.commit_hash == git("rev-parse", "HEAD", cwd=path).strip()
    assert (commit.files_changed, commit.insertions, commit.deletions) == (1, 1, 0)
    assert git("log", "-1", "--format=%an <%ae>", cwd=path).strip() == "Bridge Bot <bot@example.com>"
    pushed = await client.op({"op": "push", "session": "ops-s", "setUpstream": True})
    assert pushed.ok and pushed.branch == "topic/ops"
    assert remote.log("topic/ops")[0] == commit.commit_hash
    status = await client.op({"op": "status", "session": "ops-s"})
    assert status.ok and status.dirty is False and status.ahead == 0
    bad = await client.op({"op": "branch", "session": "ops-s", "branch": "--upload-pack=touch /tmp/x"})
    assert not bad.ok and bad.error_type == "invalid_task"
    missing = await client.op({"op": "commit", "session": "no-such-session", "message": "x"})
    assert not missing.ok and "no session" in missing.error


@pytest.mark.parametrize(
    ("git_spec", "needle"),
    [
        ({"url": "ext::sh -c touch% {marker}"}, "ext"),
        ({"url": "fd::3"}, "fd"),
        ({"url": "https://example.invalid/repo.git", "branch": "--upload-pack=touch {marker}"}, "branch"),
        ({"url": "https://example.invalid/repo.git", "ref": "-c core.sshCommand=touch {marker}"}, "ref"),
    ],
)
async def test_malicious_git_inputs_are_rejected_and_nothing_runs(git_stack, tmp_path, git_spec, needle):
    _, client = git_stack
    marker = tmp_path / "pwned"
    spec = {k: v.format(marker=marker) for k, v in git_spec.items()}
    result = await client.run("hello", workspace=f"evil-{needle}", session=f"evil-{needle}", git=spec, wait=60)
    assert result.status == "error"
    assert result.error_type == "invalid_task"
    assert not marker.exists()


async def test_file_urls_are_refused_unless_allowed(nats_server, tmp_path, remote):
    naming = unique_naming()
    async with (
        Sidecar(sidecar_config(nats_server.url, tmp_path, naming)),
        await CodingClient.connect(nats_server.url, naming=naming) as client,
    ):
        result = await client.run("hello", workspace="f", git={"url": f"file://{remote.bare}"}, wait=60)
    assert result.status == "error" and "file" in result.error


async def test_cleanup_policies_and_workflow_scope(git_stack):
    sidecar, client = git_stack
    root = root_of(sidecar)
    task = client.build_task("create x.txt with content x", workspace="gone-ws", session="gone-s")
    task.workspace.cleanup = "on_success"
    assert (await client.run(task, wait=90)).status == "completed"
    assert not (root / "gone-ws").exists()

    opened = await client.op({"op": "open", "session": "end-s", "workspace": "end-ws", "cleanup": "on_session_end"})
    assert opened.ok and (root / "end-ws").is_dir()
    closed = await client.op({"op": "close", "session": "end-s"})
    assert closed.ok and closed.cleaned_up and not (root / "end-ws").exists()
    assert (await client.get_session("end-s")).closed is True  # kept, so it can be continued

    for name in ("wf-a", "wf-b"):
        await client.op({"op": "open", "session": name, "workspace": "wf-ws", "scope": "workflow",
                         "scopeID": "wf-1", "cleanup": "on_session_end"})
    closed = await client.op({"op": "close", "session": "wf-a"})
    assert closed.ok and not closed.cleaned_up and (root / "wf-ws").is_dir()
    closed = await client.op({"op": "close", "session": "wf-b", "scope": "workflow"})
    assert closed.cleaned_up and not (root / "wf-ws").exists()


async def test_sweeper_removes_abandoned_workspaces_only(git_stack):
    sidecar, client = git_stack
    root = root_of(sidecar)
    await client.run("hello", workspace="old-ws", session="old-s", wait=90)
    await client.run("hello", workspace="recent-ws", session="recent-s", wait=90)
    janitor = sidecar.runtime.janitor
    await janitor.touch(root / "old-ws", at=time.time() - 3600)
    removed = await janitor.sweep(max_age=1800)
    assert str(root / "old-ws") in removed and not (root / "old-ws").exists()
    assert (root / "recent-ws").is_dir() and str(root / "recent-ws") not in removed


# ----------------------------------------------------------------------------------- credentials


@pytest.fixture
async def http_remote(tmp_path):
    remote = make_remote(tmp_path / "http", "project.git")
    server = GitHttpServer(remote.bare.parent, CANARY)
    await server.start()
    yield remote, f"{server.url}/project.git"
    await server.stop()


async def test_each_token_source_works_and_a_wrong_token_fails_redacted(git_stack, http_remote):
    _, client = git_stack
    _, url = http_remote
    assert (await client.run("hello", workspace="tok-task", git={"url": url, "token": CANARY}, wait=90)).ok
    state = await client._bucket(client.naming.state_bucket)
    await state.put("github-token", CANARY.encode())
    assert (await client.run("hello", workspace="tok-kv", git={"url": url, "tokenFromKV": "github-token"},
                             wait=90)).ok
    wrong_token = "ghp_wrongwrongwrongwrongwrong1234"
    wrong = await client.run("hello", workspace="tok-wrong", git={"url": url, "token": wrong_token}, wait=90)
    assert wrong.status == "error" and wrong.error_type == "git_error"
    assert "auth" in wrong.error.lower() and "wrongwrong" not in wrong.error
    missing = await client.run("hello", workspace="tok-none", git={"url": url, "tokenFromKV": "nope"}, wait=90)
    assert missing.status == "error" and "nope" in missing.error


async def test_canary_token_never_leaks(nats_server, tmp_path, http_remote):
    """Clone and push with a token from the sidecar's environment: it appears in no NATS message on
    any subject, no KV value, not in the sidecar's log, and in no file of the workspace."""
    remote, url = http_remote
    naming = unique_naming()
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({
        "nats": {"url": nats_server.url}, "naming": naming.model_dump(),
        "workspace_root": str(tmp_path / "workspaces"), "data_dir": str(tmp_path / "data"),
        "offline_model": True, "log_level": "DEBUG",
        "git": {"token_env": "CANARY_GIT_TOKEN", "allowed_schemes": ["http"]},
    }))
    sidecar = SidecarProcess(config, tmp_path / "sidecar.log")
    os.environ["CANARY_GIT_TOKEN"] = CANARY
    try:
        await sidecar.start()
    finally:
        del os.environ["CANARY_GIT_TOKEN"]
    seen: list[bytes] = []
    async with await CodingClient.connect(nats_server.url, naming=naming) as client:
        async def spy(msg):
            seen.append(msg.subject.encode() + b" " + msg.data + b" " + json.dumps(dict(msg.headers or {})).encode())

        sub = await client.nc.subscribe(">", cb=spy)
        try:
            opened = await client.op({"op": "open", "session": "canary", "workspace": "canary-ws", "git": {"url": url}})
            assert opened.ok, opened.error
            done = await client.run("run echo token is ${CANARY_GIT_TOKEN:-unset} > env.txt\n"
                                    "create a.txt with content a", workspace="canary-ws", session="canary", wait=90)
            assert done.status == "completed"
            assert (await client.op({"op": "branch", "session": "canary", "branch": "canary-branch"})).ok
            assert (await client.op({"op": "commit", "session": "canary", "message": "canary"})).ok
            pushed = await client.op({"op": "push", "session": "canary", "setUpstream": True})
            assert pushed.ok, pushed.error
        finally:
            await sub.unsubscribe()
            await sidecar.stop()
        kv_values = []
        js = client.nc.jetstream()
        for bucket in (naming.sessions_bucket, naming.state_bucket, naming.tasks_bucket):
            kv = await js.key_value(bucket)
            for key in await list_keys(js, bucket):
                with contextlib.suppress(KeyNotFoundError):  # deleted since
                    kv_values.append((await kv.get(key)).value or b"")
    assert remote.log("canary-branch")[0] == git("rev-parse", "HEAD", cwd=tmp_path / "workspaces/canary-ws").strip()
    token = CANARY.encode()
    assert len(seen) > 20 and not [m for m in seen if token in m]
    assert kv_values and not [v for v in kv_values if token in v]
    assert CANARY not in (tmp_path / "sidecar.log").read_text(errors="replace")
    workspace_files = [p for p in (tmp_path / "workspaces").rglob("*") if p.is_file()]
    assert any(p.name == "config" and p.parent.name == ".git" for p in workspace_files)
    assert not [p for p in workspace_files if token in p.read_bytes()]
    # The agent's own shell never sees the token either.
    assert "unset" in (tmp_path / "workspaces" / "canary-ws" / "env.txt").read_text()
