"""Clone and push over smart HTTP against a local server that demands a token: the token works, a
wrong one fails clearly, and a canary token never shows up in .git/config, the workspace, events,
errors or any process's command line."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ocbridge.bridge.redact import Redactor
from ocbridge.bridge.workspace.git import GitError, GitSettings, GitTimeout, commit, prepare, push
from ocbridge.client.protocol import GitSpec
from support.gitserver import GitHttpServer, Remote, git, make_remote

CANARY = "canary-tok-7d41c9e0b2a8"
SETTINGS = GitSettings(allowed_schemes=["http"])


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Remote:
    return make_remote(tmp_path_factory.mktemp("http-remotes"))


@pytest.fixture(scope="module")
async def server(remote) -> AsyncIterator[GitHttpServer]:
    srv = GitHttpServer(remote.bare.parent, CANARY)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
def url(server) -> str:
    server.delay = 0.0
    return f"{server.url}/project.git"


class Events(list):
    async def __call__(self, event_type, event, content=None) -> None:
        self.append((event_type, event.to_dict(), content))


def assert_no_canary_anywhere(ws: Path, *texts: object) -> None:
    for path in ws.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), f"token written to {path}"
    for text in texts:
        assert CANARY not in str(text)


async def test_clone_with_token_keeps_it_out_of_everything(server, url, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    events = Events()
    redactor = Redactor()
    state = await prepare(ws, GitSpec(url=url, token=CANARY), settings=SETTINGS, emit=events, redactor=redactor)
    assert state.branch == "trunk" and (ws / "README.md").exists()
    assert any(h and h.startswith("Basic ") for h in server.auth_seen)
    assert f"url = {url}" in (ws / ".git" / "config").read_text()
    # A pull with the token, then the whole workspace (.git included) is searched for it.
    state = await prepare(ws, GitSpec(url=url, token=CANARY), settings=SETTINGS, emit=events, redactor=redactor)
    assert [e[0] for e in events] == ["git_clone", "git_pull"]
    assert_no_canary_anywhere(ws, events, state)
    assert redactor.text(CANARY) == CANARY  # the per-task registration was released


async def test_token_in_url_is_moved_out_of_it(url, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    events = Events()
    dirty_url = url.replace("http://", f"http://someone:{CANARY}@")
    await prepare(ws, GitSpec(url=dirty_url), settings=SETTINGS, emit=events)
    assert_no_canary_anywhere(ws, events)
    assert events[0][1]["url"] == url


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789"])
async def test_missing_or_wrong_token_fails_clearly(url, tmp_path, token):
    ws = tmp_path / "ws"
    ws.mkdir()
    with pytest.raises(GitError) as info:
        await prepare(ws, GitSpec(url=url, token=token), settings=SETTINGS)
    message = str(info.value)
    assert "authentication failed" in message
    assert CANARY not in message and "wrong-token-0123456789" not in message + info.value.stderr
    assert list(ws.iterdir()) == []


async def test_sidecar_token_only_for_configured_hosts(url, tmp_path):
    for hosts, works in ((["github.com"], False), (["127.0.0.1"], True)):
        ws = tmp_path / f"ws-{works}"
        ws.mkdir()
        settings = GitSettings(allowed_schemes=["http"], token=CANARY, token_hosts=hosts)
        if works:
            await prepare(ws, GitSpec(url=url), settings=settings)
        else:
            with pytest.raises(GitError, match="authentication failed"):
                await prepare(ws, GitSpec(url=url), settings=settings)


async def test_operator_credential_store_never_receives_the_token(url, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[credential]\n\thelper = store\n")
    monkeypatch.setenv("HOME", str(home))
    ws = tmp_path / "ws"
    ws.mkdir()
    await prepare(ws, GitSpec(url=url, token=CANARY), settings=SETTINGS)
    assert not (home / ".git-credentials").exists()


async def test_token_never_on_a_command_line_during_a_slow_clone(server, url, tmp_path):
    server.delay = 0.4
    ws = tmp_path / "ws"
    ws.mkdir()
    task = asyncio.create_task(prepare(ws, GitSpec(url=url, token=CANARY), settings=SETTINGS))
    seen_git = 0
    while not task.done():
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert CANARY.encode() not in cmdline, cmdline
            seen_git += cmdline.startswith(b"git\0") and str(ws).encode() in cmdline
        await asyncio.sleep(0.05)
    await task
    assert seen_git, "never saw the clone running"


async def test_clone_timeout_stops_git_and_cleans_up(server, url, tmp_path):
    server.delay = 1.5
    ws = tmp_path / "ws"
    ws.mkdir()
    settings = GitSettings(allowed_schemes=["http"], clone_timeout=0.4)
    with pytest.raises(GitTimeout, match="timed out"):
        await prepare(ws, GitSpec(url=url, token=CANARY), settings=settings)
    assert list(ws.iterdir()) == []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            assert str(ws).encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue


async def test_push_with_token(remote, url, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    await prepare(ws, GitSpec(url=url, token=CANARY), settings=SETTINGS)
    (ws / "pushed.txt").write_text("over http\n")
    made = await commit(ws, "push me", settings=SETTINGS)
    with pytest.raises(GitError, match="authentication failed") as info:
        await push(ws, branch="trunk", token="wrong-token-0123456789", settings=SETTINGS)
    assert "wrong-token" not in str(info.value)
    result = await push(ws, token=CANARY, set_upstream=True, settings=SETTINGS)
    assert (result.ok, result.remote, result.branch, result.commit_hash) == (True, "origin", "trunk", made.commit_hash)
    assert remote.log("trunk")[0] == made.commit_hash
    assert git("config", "branch.trunk.remote", cwd=ws).strip() == "origin"
    assert_no_canary_anywhere(ws, result.to_dict())
    # Leave the shared remote as other tests expect it.
    git(f"--git-dir={remote.bare}", "update-ref", "refs/heads/trunk", remote.commits["second"])
