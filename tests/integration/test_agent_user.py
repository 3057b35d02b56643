"""``agent_user``: the agent runs under a user of its own, apart from the sidecar's files and secrets.

Real git over smart HTTP with a token, real OpenCode through a real sidecar. The agent's user is
``nobody`` (65534); these tests need root, as the sidecar does in this mode (CI runs as root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ocbridge.bridge.agent_user import AgentUser, AgentUserError, resolve_agent_user
from ocbridge.bridge.redact import Redactor
from ocbridge.bridge.sidecar import Sidecar
from ocbridge.bridge.workspace.git import GitError, GitSettings, commit, prepare, push
from ocbridge.bridge.workspace.git.mirror import forget_mirrors, mirror_path
from ocbridge.client.client import CodingClient
from ocbridge.client.protocol import GitSpec
from support.gitserver import GitHttpServer, Remote, git, make_remote
from support.stack import require_tools, sidecar_config, unique_naming

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to the agent's user needs root")

CANARY = "canary-agent-tok-51f0e2"
AGENT_UID = 65534


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder the agent's user can pass through (pytest's own tmp folders are 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="ocbridge-agent-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Remote:
    return make_remote(tmp_path_factory.mktemp("agent-remotes"))


@pytest.fixture(scope="module")
async def server(remote) -> AsyncIterator[GitHttpServer]:
    srv = GitHttpServer(remote.bare.parent, CANARY)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
def agent(shared_tmp) -> AgentUser:
    user = resolve_agent_user(str(AGENT_UID), shared_tmp / "data")
    user.prepare()
    return user


@pytest.fixture
def settings(agent) -> GitSettings:
    return GitSettings(allowed_schemes=["http"], user_name="Bot", user_email="bot@example.com").for_agent(agent)


def workspace(agent: AgentUser, root: Path, name: str) -> Path:
    path = root / "workspaces" / name
    path.mkdir(parents=True)
    agent.own(path)
    return path


def as_root_git(*args: str, cwd: Path) -> str:
    """git as this (root) process in an agent-owned repository: git refuses unless told to trust it."""
    return git("-c", "safe.directory=*", *args, cwd=cwd)


def owners(path: Path) -> set[int]:
    return {p.lstat().st_uid for p in [path, *path.rglob("*")]}


def assert_token_nowhere(*folders: Path) -> None:
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert CANARY.encode() not in path.read_bytes(), f"token written to {path}"


def test_the_agent_user_must_be_someone_else_and_the_sidecar_root(tmp_path):
    with pytest.raises(AgentUserError, match="root"):
        resolve_agent_user("0", tmp_path)
    with pytest.raises(AgentUserError, match="no such user"):
        resolve_agent_user("no-such-user-here", tmp_path)
    assert resolve_agent_user("nobody", tmp_path).uid == AGENT_UID


def test_data_dir_is_passable_not_readable_and_homes_belong_to_the_agent(agent):
    assert stat.S_IMODE(agent.data_dir.stat().st_mode) == 0o711
    # What an earlier run left there readable is closed when the sidecar starts again.
    (agent.data_dir / "nats").mkdir(mode=0o755)
    (agent.data_dir / "old.log").write_text("x")
    (agent.data_dir / "old.log").chmod(0o644)
    agent.prepare()
    assert stat.S_IMODE((agent.data_dir / "nats").stat().st_mode) == 0o700
    assert stat.S_IMODE((agent.data_dir / "old.log").stat().st_mode) == 0o600
    assert stat.S_IMODE(agent.git_config.stat().st_mode) == 0o644
    home = agent.home("git")
    assert home.stat().st_uid == AGENT_UID and stat.S_IMODE(home.stat().st_mode) == 0o700
    assert agent.mirror_root.stat().st_uid == os.geteuid()


async def test_clone_pull_and_push_with_a_token_never_give_it_to_the_agent(server, remote, agent, settings,
                                                                          shared_tmp):
    url = f"{server.url}/project.git"
    ws = workspace(agent, shared_tmp, "ws")
    redactor = Redactor()
    state = await prepare(ws, GitSpec(url=url, token=CANARY), settings=settings, redactor=redactor)
    assert state.action == "cloned" and state.commit == remote.commits["second"]
    assert state.default_branch == "trunk"
    # Everything in the workspace is the agent's; git's origin is the remote, not the mirror.
    assert owners(ws) == {AGENT_UID}
    assert as_root_git("remote", "get-url", "origin", cwd=ws).strip() == url
    mirror = mirror_path(agent, ws, url)
    assert mirror.is_dir() and mirror.stat().st_uid == os.geteuid()
    assert_token_nowhere(ws, agent.data_dir)

    # A pull through the mirror brings the new upstream commit.
    later = remote.commit({"later.txt": "later\n"}, "later")
    state = await prepare(ws, GitSpec(url=url, token=CANARY), settings=settings, redactor=redactor)
    assert state.action == "pulled" and state.commit == later
    assert owners(ws) == {AGENT_UID}

    # A commit and a push: the remote has it, the remote-tracking branch and upstream are set.
    (ws / "pushed.txt").write_text("from the agent\n")
    agent.own(ws / "pushed.txt")
    made = await commit(ws, "agent work", settings=settings, redactor=redactor)
    pushed = await push(ws, branch="trunk", set_upstream=True, token=CANARY, settings=settings, redactor=redactor)
    assert pushed.ok and made.commit_hash == pushed.commit_hash
    assert remote.log("trunk")[0] == made.commit_hash
    assert as_root_git("rev-parse", "refs/remotes/origin/trunk", cwd=ws).strip() == made.commit_hash
    assert as_root_git("rev-parse", "--abbrev-ref", "trunk@{upstream}", cwd=ws).strip() == "origin/trunk"
    assert owners(ws) == {AGENT_UID}
    assert_token_nowhere(ws, agent.data_dir)

    # Deleting the workspace's mirrors leaves the workspace as it is.
    forget_mirrors(agent, ws)
    assert not mirror.exists() and (ws / ".git").is_dir()


async def test_refs_and_shallow_clones_go_through_the_mirror(server, remote, agent, settings, shared_tmp):
    url = f"{server.url}/project.git"
    ws = workspace(agent, shared_tmp, "shallow")
    first = remote.commits["first"]
    state = await prepare(ws, GitSpec(url=url, token=CANARY, ref=first, shallow=True), settings=settings,
                          redactor=Redactor())
    assert state.commit == first and state.branch is None
    assert owners(ws) == {AGENT_UID}
    tagged = workspace(agent, shared_tmp, "tagged")
    state = await prepare(tagged, GitSpec(url=url, token=CANARY, ref="v1"), settings=settings, redactor=Redactor())
    assert state.commit == first


async def test_a_wrong_token_fails_clearly_and_leaves_nothing(server, agent, settings, shared_tmp):
    ws = workspace(agent, shared_tmp, "denied")
    with pytest.raises(GitError) as caught:
        await prepare(ws, GitSpec(url=f"{server.url}/project.git", token="wrong-token"), settings=settings,
                      redactor=Redactor())
    assert "authentication failed" in str(caught.value)
    assert list(ws.iterdir()) == []
    assert not mirror_path(agent, ws, f"{server.url}/project.git").exists()


# ------------------------------------------------------------------------------ a real sidecar


@contextlib.asynccontextmanager
async def agent_sidecar(nats_url: str, folder: Path, **overrides) -> AsyncIterator[tuple[Sidecar, CodingClient]]:
    """A sidecar run in-process with ``agent_user: nobody``, and a client of it."""
    require_tools()
    naming = unique_naming()
    sidecar = Sidecar(sidecar_config(nats_url, folder, naming, agent_user="nobody", **overrides))
    await sidecar.start()
    try:
        client = await CodingClient.connect(nats_url, naming=naming)
        try:
            yield sidecar, client
        finally:
            await client.close()
    finally:
        await sidecar.stop(grace=5)


@pytest.fixture(params=["opencode", "opencode-cli", "claudecode"])
async def agent_stack(request, nats_server, shared_tmp) -> AsyncIterator[tuple[Sidecar, CodingClient]]:
    # Claude Code asks before Bash unless allowed (acceptEdits covers edits only).
    extra = {"claudecode": {"allowed_tools": ["Bash"]}} if request.param == "claudecode" else {}
    async with agent_sidecar(nats_server.url, shared_tmp, engine=request.param, **extra) as stack:
        yield stack


@pytest.mark.slow
async def test_the_agent_runs_as_its_user_and_cannot_read_the_sidecars_files(agent_stack, shared_tmp):
    sidecar, client = agent_stack
    data_dir = Path(sidecar.config.data_dir).resolve()
    log_name = {"opencode": "opencode-server.log"}.get(sidecar.config.engine, "sidecar-secret.txt")
    private = data_dir / "sidecar-secret.txt"
    private.write_text(CANARY)  # as the sidecar writes its files (this test runs it in-process)
    result = await client.run(
        # A script: OpenCode's own rules refuse commands that name paths outside the workspace,
        # which the agent could get around; the user's rights are what must stop it.
        f"create probe.sh with content id -u > uid.txt\\ncat {private} > leak.txt 2>&1\\n"
        f"ls {data_dir} > listing.txt 2>&1\\ncat {data_dir}/{log_name} > store.txt 2>&1\\n\n"
        "run sh probe.sh",
        workspace="agent-ws", session="agent-s", wait=120,
    )
    assert result.status == "completed", result.error
    ws = Path(sidecar.config.workspace_root).resolve() / "agent-ws"
    assert (ws / "uid.txt").read_text().strip() == str(AGENT_UID)
    assert "Permission denied" in (ws / "leak.txt").read_text()
    assert "Permission denied" in (ws / "listing.txt").read_text()
    assert "Permission denied" in (ws / "store.txt").read_text()
    assert owners(ws) == {AGENT_UID}
    assert {c.path for c in result.changes} >= {"probe.sh", "uid.txt", "leak.txt"}
    assert CANARY not in (ws / "leak.txt").read_text()


@pytest.fixture
async def agent_git_stack(nats_server, shared_tmp) -> AsyncIterator[tuple[Sidecar, CodingClient]]:
    git_settings = {"allow_file_urls": True, "user_name": "Bridge Bot", "user_email": "bot@example.com"}
    async with agent_sidecar(nats_server.url, shared_tmp, git=git_settings) as stack:
        yield stack


@pytest.mark.slow
async def test_a_git_session_works_end_to_end_as_the_agents_user(agent_git_stack, tmp_path):
    sidecar, client = agent_git_stack
    remote = make_remote(tmp_path / "remotes")
    url = f"file://{remote.bare}"
    # A nested name: the folder between the root and the workspace is the sidecar's, passable.
    opened = await client.op({"op": "open", "session": "ag-s", "workspace": "team/ag-ws", "git": {"url": url},
                              "cleanup": "on_session_end"})
    assert opened.ok and opened.repo_cloned, opened.error
    done = await client.run("create notes.txt with content hi\nedit src/app.py replace return 2 with return 3",
                            workspace="team/ag-ws", session="ag-s", wait=120)
    assert done.status == "completed", done.error
    assert {(c.path, c.status) for c in done.changes} == {("notes.txt", "added"), ("src/app.py", "modified")}
    assert "+    return 3" in (await client.artifact(done.patch)).decode()
    path = Path(sidecar.config.workspace_root).resolve() / "team" / "ag-ws"
    assert owners(path) == {AGENT_UID}

    committed = await client.op({"op": "commit", "session": "ag-s", "message": "agent work"})
    assert committed.ok and (committed.files_changed, committed.insertions) == (2, 2), committed.error
    pushed = await client.op({"op": "push", "session": "ag-s", "setUpstream": True})
    assert pushed.ok, pushed.error
    assert remote.log("trunk")[0] == committed.commit_hash
    status = await client.op({"op": "status", "session": "ag-s"})
    assert status.ok and status.dirty is False and status.ahead == 0
    assert owners(path) == {AGENT_UID}

    agent = sidecar.config.git.agent
    assert agent is not None and list(agent.mirror_root.glob("*.git"))
    closed = await client.op({"op": "close", "session": "ag-s"})
    assert closed.ok and closed.cleaned_up and not path.exists()
    assert list(agent.mirror_root.glob("*.git")) == []
