"""Preparing a task's git workspace from a local bare repository: clone, branch, ref, reuse + pull,
origin mismatch, shallow clones, and the events that go with them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ocbridge.bridge.workspace.git import GitError, GitInputError, GitSettings, begin, collect, commit, prepare, status
from ocbridge.client.protocol import EventGit, GitSpec
from support.gitserver import Remote, git, make_remote, write

SETTINGS = GitSettings(allow_file_urls=True)


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, EventGit, str | None]] = []

    async def __call__(self, event_type: str, event: EventGit, content: str | None = None) -> None:
        self.items.append((event_type, event, content))

    @property
    def types(self) -> list[str]:
        return [t for t, _, _ in self.items]


@pytest.fixture
def remote(tmp_path) -> Remote:
    return make_remote(tmp_path / "remotes")


@pytest.fixture
def ws(tmp_path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    return path


def head(path: Path) -> str:
    return git("rev-parse", "HEAD", cwd=path).strip()


def tree_state(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


async def test_clone_takes_the_default_branch_from_the_remote(remote, ws):
    events = Events()
    state = await prepare(ws, GitSpec(url=str(remote.bare)), settings=SETTINGS, emit=events)
    assert (state.action, state.branch, state.default_branch) == ("cloned", "trunk", "trunk")
    assert state.commit == remote.commits["second"] == head(ws)
    assert events.types == ["git_clone"]
    assert events.items[0][1] == EventGit(url=str(remote.bare), branch="trunk", commit=state.commit)
    assert git("remote", "get-url", "origin", cwd=ws).strip() == str(remote.bare)
    assert (ws / "src" / "app.py").read_text() == "def main():\n    return 2\n"


async def test_file_urls_are_refused_by_default(remote, ws):
    with pytest.raises(GitInputError, match="allow_file_urls"):
        await prepare(ws, GitSpec(url=str(remote.bare)), settings=GitSettings())
    with pytest.raises(GitInputError):
        await prepare(ws, GitSpec(url=f"file://{remote.bare}"), settings=GitSettings())
    assert list(ws.iterdir()) == []


async def test_clone_a_branch(remote, ws):
    state = await prepare(ws, GitSpec(url=f"file://{remote.bare}", branch="feature"), settings=SETTINGS)
    assert (state.branch, state.commit) == ("feature", remote.commits["feature"])
    assert (ws / "feature.txt").exists()


@pytest.mark.parametrize("which", ["tag", "commit"])
async def test_clone_then_check_out_a_ref(remote, ws, which):
    ref = "v1" if which == "tag" else remote.commits["first"]
    events = Events()
    state = await prepare(ws, GitSpec(url=str(remote.bare), ref=ref), settings=SETTINGS, emit=events)
    assert state.branch is None and state.commit == remote.commits["first"] == head(ws)
    assert events.types == ["git_clone", "git_checkout"]
    assert events.items[1][1].commit == remote.commits["first"] and events.items[1][1].branch is None


async def test_reuse_pulls_new_upstream_commits(remote, ws):
    await prepare(ws, GitSpec(url=str(remote.bare)), settings=SETTINGS)
    new = remote.commit({"NEWS": "fresh\n"}, "upstream moved")
    events = Events()
    state = await prepare(ws, GitSpec(url=str(remote.bare) + "/", pull=True), settings=SETTINGS, emit=events)
    assert (state.action, state.commit, state.pull_skipped) == ("pulled", new, None)
    assert (ws / "NEWS").read_text() == "fresh\n"
    assert events.types == ["git_pull"]
    assert events.items[0][1] == EventGit(url=str(remote.bare) + "/", branch="trunk", commit=new)


async def test_reuse_without_pull_leaves_the_clone_alone(remote, ws):
    await prepare(ws, GitSpec(url=str(remote.bare)), settings=SETTINGS)
    remote.commit({"NEWS": "fresh\n"}, "upstream moved")
    events = Events()
    state = await prepare(ws, GitSpec(url=str(remote.bare), pull=False), settings=SETTINGS, emit=events)
    assert (state.action, state.commit) == ("reused", remote.commits["second"])
    assert events.types == [] and not (ws / "NEWS").exists()


async def test_reuse_switches_to_another_branch(remote, ws):
    await prepare(ws, GitSpec(url=str(remote.bare), shallow=True), settings=SETTINGS)
    events = Events()
    state = await prepare(ws, GitSpec(url=str(remote.bare), branch="feature"), settings=SETTINGS, emit=events)
    assert (state.branch, state.commit) == ("feature", remote.commits["feature"])
    assert events.types == ["git_pull", "git_checkout"]
    assert git("rev-parse", "--abbrev-ref", "feature@{upstream}", cwd=ws).strip() == "origin/feature"
    with pytest.raises(GitError, match="neither locally nor on origin"):
        await prepare(ws, GitSpec(url=str(remote.bare), branch="nope", pull=False), settings=SETTINGS)


async def test_origin_mismatch_is_an_error_and_nothing_is_touched(tmp_path, remote, ws):
    other = make_remote(tmp_path / "other", name="other.git")
    await prepare(ws, GitSpec(url=str(remote.bare)), settings=SETTINGS)
    (ws / "work.txt").write_text("uncommitted work\n")
    before = tree_state(ws), head(ws), (ws / ".git" / "config").read_bytes()
    with pytest.raises(GitError) as info:
        await prepare(ws, GitSpec(url=str(other.bare), branch="feature"), settings=SETTINGS)
    assert info.value.error_type == "workspace_error"
    assert "already holds a clone of" in str(info.value) and "nothing was changed" in str(info.value)
    assert (tree_state(ws), head(ws), (ws / ".git" / "config").read_bytes()) == before


async def test_a_folder_with_files_is_never_cloned_over(remote, ws):
    (ws / "notes.txt").write_text("mine\n")
    with pytest.raises(GitError, match="not a git clone") as info:
        await prepare(ws, GitSpec(url=str(remote.bare)), settings=SETTINGS)
    assert info.value.error_type == "workspace_error"
    assert [p.name for p in ws.iterdir()] == ["notes.txt"]


async def test_failed_clone_leaves_the_folder_empty(remote, ws):
    with pytest.raises(GitError, match="nope"):
        await prepare(ws, GitSpec(url=str(remote.bare), branch="nope"), settings=SETTINGS)
    assert list(ws.iterdir()) == []


async def test_shallow_clone(remote, ws):
    state = await prepare(ws, GitSpec(url=f"file://{remote.bare}", shallow=True), settings=SETTINGS)
    assert state.shallow and state.commit == remote.commits["second"]
    assert git("rev-list", "--count", "HEAD", cwd=ws).strip() == "1"
    # A later pull on the shallow clone still fast-forwards.
    new = remote.commit({"NEWS": "x\n"}, "more")
    pulled = await prepare(ws, GitSpec(url=f"file://{remote.bare}"), settings=SETTINGS)
    assert (pulled.action, pulled.commit, pulled.shallow) == ("pulled", new, True)


@pytest.mark.parametrize("which", ["tag", "commit"])
async def test_shallow_clone_fetches_a_ref_outside_its_history(remote, ws, which):
    ref = "v1" if which == "tag" else remote.commits["first"]
    settings = GitSettings(allow_file_urls=True, shallow=True)
    state = await prepare(ws, GitSpec(url=f"file://{remote.bare}", ref=ref), settings=settings)
    assert state.commit == remote.commits["first"]


async def test_diverged_pull_is_skipped_and_local_work_kept(remote, ws):
    await prepare(ws, GitSpec(url=str(remote.bare)), settings=SETTINGS)
    (ws / "local.txt").write_text("local\n")
    git("add", "-A", cwd=ws)
    git("commit", "-q", "-m", "local work", cwd=ws)
    local = head(ws)
    remote.commit({"NEWS": "upstream\n"}, "upstream")
    events = Events()
    state = await prepare(ws, GitSpec(url=str(remote.bare)), settings=SETTINGS, emit=events)
    assert state.commit == local and "diverged" in (state.pull_skipped or "")
    assert events.items[0][0] == "git_pull" and "diverged" in (events.items[0][2] or "")


async def test_pull_with_conflicting_uncommitted_changes_is_skipped(remote, ws):
    await prepare(ws, GitSpec(url=str(remote.bare)), settings=SETTINGS)
    (ws / "src" / "app.py").write_text("mine\n")
    remote.commit({"src/app.py": "theirs\n"}, "upstream edit")
    state = await prepare(ws, GitSpec(url=str(remote.bare)), settings=SETTINGS)
    assert "uncommitted changes" in (state.pull_skipped or "")
    assert (ws / "src" / "app.py").read_text() == "mine\n" and state.commit == remote.commits["second"]


async def test_pull_with_unrelated_uncommitted_changes_fast_forwards(remote, ws):
    await prepare(ws, GitSpec(url=str(remote.bare)), settings=SETTINGS)
    (ws / "README.md").write_text("my notes\n")
    new = remote.commit({"src/app.py": "theirs\n"}, "upstream edit")
    state = await prepare(ws, GitSpec(url=str(remote.bare)), settings=SETTINGS)
    assert (state.commit, state.pull_skipped) == (new, None)
    assert (ws / "README.md").read_text() == "my notes\n"


async def test_reuse_removes_credentials_left_in_origin(remote, ws):
    await prepare(ws, GitSpec(url=str(remote.bare)), settings=SETTINGS)
    # A workspace cloned by an older worker that put the token in the URL (port 1: refused at once).
    git("remote", "set-url", "origin", "https://x-access-token:old-token-123456@127.0.0.1:1/org/repo.git", cwd=ws)
    with pytest.raises(GitError, match="cannot be reached") as info:
        await prepare(ws, GitSpec(url="https://127.0.0.1:1/org/repo.git"),
                      settings=GitSettings(fetch_timeout=5.0))
    assert "old-token-123456" not in str(info.value)
    config = (ws / ".git" / "config").read_text()
    assert "old-token-123456" not in config and "url = https://127.0.0.1:1/org/repo.git" in config


def sha256_remote(root: Path) -> tuple[Path, Path, str]:
    """A bare SHA-256 repository (64-digit ids) on ``trunk`` with a tag ``v1``, its seed clone, and
    the tagged commit."""
    bare, seed = root / "sha256.git", root / "sha256.seed"
    try:
        git("init", "-q", "--bare", "-b", "trunk", "--object-format=sha256", str(bare))
    except AssertionError:
        pytest.skip("this git cannot make SHA-256 repositories")
    git("init", "-q", "-b", "trunk", "--object-format=sha256", str(seed))
    git("remote", "add", "origin", str(bare), cwd=seed)
    write(seed, {"README.md": "# sha256\n"})
    git("add", "-A", cwd=seed)
    git("commit", "-q", "-m", "first", cwd=seed)
    git("tag", "v1", cwd=seed)
    git("push", "-q", "origin", "trunk", "v1", cwd=seed)
    return bare, seed, head(seed)


async def test_sha256_repositories_work_end_to_end(tmp_path, ws):
    # GitPython reads only 40-digit SHA-1 ids (``Repo.head.commit`` raises here): the reads stay on
    # the git CLI, and this keeps them honest.
    bare, seed, first = sha256_remote(tmp_path / "remotes")
    url = f"file://{bare}"
    events = Events()
    state = await prepare(ws, GitSpec(url=url, shallow=True), settings=SETTINGS, emit=events)
    assert (state.action, state.branch, state.default_branch, state.commit) == ("cloned", "trunk", "trunk", first)
    assert len(first) == 64 and state.shallow and events.items[0][1].commit == first

    write(seed, {"NEWS": "fresh\n"})
    git("add", "-A", cwd=seed)
    git("commit", "-q", "-m", "second", cwd=seed)
    git("push", "-q", "origin", "trunk", cwd=seed)
    second = head(seed)
    pulled = await prepare(ws, GitSpec(url=url), settings=SETTINGS)
    assert (pulled.action, pulled.branch, pulled.commit, pulled.shallow) == ("pulled", "trunk", second, True)
    tagged = await prepare(ws, GitSpec(url=url, ref="v1"), settings=SETTINGS)
    assert (tagged.branch, tagged.commit) == (None, first)
    by_id = await prepare(ws, GitSpec(url=url, ref=second[:12]), settings=SETTINGS)
    assert (by_id.branch, by_id.commit) == (None, second)

    await prepare(ws, GitSpec(url=url, branch="trunk"), settings=SETTINGS)
    baseline = await begin(ws, settings=SETTINGS)
    write(ws, {"README.md": "# sha256\nmore\n"})
    changes = await collect(ws, baseline, settings=SETTINGS)
    assert [(c.path, c.status, c.insertions) for c in changes.changes] == [("README.md", "modified", 1)]
    assert (changes.branch, changes.commit, changes.dirty) == ("trunk", second, True)
    done = await commit(ws, "more", settings=GitSettings(allow_file_urls=True, user_name="B", user_email="b@x"))
    assert done.commit_hash == head(ws) and len(done.commit_hash or "") == 64 and done.files_changed == 1
    report = await status(ws, settings=SETTINGS)
    assert (report.branch, report.dirty, report.upstream, report.ahead, report.behind) == (
        "trunk", False, "origin/trunk", 1, 0)
