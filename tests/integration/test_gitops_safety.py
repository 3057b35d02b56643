"""Git layer input safety: URLs, refs and names from a task never make git run a command, and the
hardened runner blocks dangerous transports and times out cleanly."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from ocbridge.bridge.redact import Redactor
from ocbridge.bridge.workspace.git import (
    GitCredentials,
    GitError,
    GitInputError,
    GitSettings,
    GitTimeout,
    check_branch_name,
    check_ref,
    normalize_url,
    parse_remote_url,
    prepare,
    push,
    redact_git_url,
    resolve_token,
    run_git,
)
from ocbridge.client.protocol import GitSpec
from support.gitserver import git, make_remote

PERMISSIVE = GitSettings(allow_file_urls=True, allowed_schemes=["https", "http", "ssh", "git"])


@pytest.mark.parametrize(
    ("url", "kind", "clean"),
    [
        ("https://github.com/org/repo.git", "https", "https://github.com/org/repo.git"),
        ("https://x-access-token:ghs_secret123@github.com/org/repo", "https", "https://github.com/org/repo"),
        ("https://tok3n-value@host:8443/r.git", "https", "https://host:8443/r.git"),
        ("ssh://git@github.com/org/repo.git", "ssh", "ssh://git@github.com/org/repo.git"),
        ("git@github.com:org/repo.git", "ssh", "git@github.com:org/repo.git"),
        ("git://example.com/repo", "git", "git://example.com/repo"),
    ],
)
def test_accepted_urls_lose_their_credentials(url, kind, clean):
    remote = parse_remote_url(url, GitSettings())
    assert (remote.kind, remote.url) == (kind, clean)
    assert "secret" not in remote.url and "tok3n" not in remote.url


def test_credentials_in_url_become_the_token():
    remote = parse_remote_url("https://oauth2:glpat-secret-value@gitlab.com/g/p.git", GitSettings())
    assert (remote.secret, remote.username, remote.origin) == ("glpat-secret-value", "oauth2", "https://gitlab.com")
    assert parse_remote_url("https://only-a-token@h.io/r", GitSettings()).secret == "only-a-token"


@pytest.mark.parametrize(
    "url",
    [
        "ext::sh -c touch% /tmp/pwned",
        "fd::3",
        "fd::3,4/repo",
        "foo::bar",
        "--upload-pack=touch /tmp/x",
        "-uhttps://github.com/x",
        "ssh://-oProxyCommand=touch%20x/repo",
        "-oProxyCommand=x:repo",
        "https://-host/repo",
        "gopher://example.com/repo",
        "https://host/repo\n--upload-pack=x",
        "https://host/re po",
        "",
        " https://host/repo",
        "https://host:notaport/repo",
    ],
)
def test_dangerous_or_malformed_urls_refused_even_with_everything_allowed(url):
    with pytest.raises(GitInputError) as info:
        parse_remote_url(url, PERMISSIVE)
    assert info.value.error_type == "invalid_task"


def test_file_urls_and_local_paths_need_explicit_permission(tmp_path):
    for url in (f"file://{tmp_path}", str(tmp_path)):
        with pytest.raises(GitInputError, match="allow_file_urls"):
            parse_remote_url(url, GitSettings())
        assert parse_remote_url(url, PERMISSIVE).kind == "file"
    with pytest.raises(GitInputError, match="absolute"):
        parse_remote_url("relative/repo", PERMISSIVE)


def test_schemes_limited_to_configuration():
    with pytest.raises(GitInputError, match="'http' is not allowed"):
        parse_remote_url("http://example.com/r.git", GitSettings())
    with pytest.raises(GitInputError, match="ssh"):
        parse_remote_url("git@github.com:o/r.git", GitSettings(allowed_schemes=["https"]))
    with pytest.raises(ValueError):
        GitSettings(allowed_schemes=["ext"])


def test_redact_and_normalize_url():
    assert redact_git_url("https://user:pw@host/r.git") == "https://host/r.git"
    assert redact_git_url("https://tokenonly@host/r.git") == "https://host/r.git"
    assert redact_git_url("ssh://git:pw@host/r.git") == "ssh://git@host/r.git"
    assert redact_git_url("git@host:r.git") == "git@host:r.git"
    same = ["https://GitHub.com/Org/Repo.git", "https://tok@github.com:443/Org/Repo/", "https://github.com/Org/Repo"]
    assert len({normalize_url(u) for u in same}) == 1
    assert normalize_url("git@github.com:org/repo.git") == normalize_url("ssh://git@github.com:22/org/repo")
    assert normalize_url("https://github.com/org/repo") != normalize_url("https://github.com/org/other")
    assert normalize_url("https://github.com/org/repo") != normalize_url("https://gitlab.com/org/repo")


@pytest.mark.parametrize("name", ["-b", "--orphan", "-", "a..b", "x y", "HEAD", "@{-1}", "a~1", "a^", "a:b",
                                  "refs/heads/x", "bad.lock", "a//b", "\x00x", "a\nb", ""])
async def test_bad_branch_names_refused(name):
    with pytest.raises(GitInputError):
        await check_branch_name(name)


@pytest.mark.parametrize("name", ["main", "feature/x-1", "release-2.0", "user/alice/topic"])
async def test_good_branch_names_accepted(name):
    assert await check_branch_name(name) == name


async def test_refs():
    for ok in ("v1.2.3", "deadbeef", "0" * 40, "0" * 64, "refs/tags/v1", "release/1"):
        assert await check_ref(ok) == ok
    for bad in ("--upload-pack=touch /tmp/x", "-x", "HEAD~1", "a..b", "v1^{}", "x y"):
        with pytest.raises(GitInputError):
            await check_ref(bad)


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "an injected command ran"


@pytest.mark.parametrize("field", ["url", "ref", "branch"])
@pytest.mark.parametrize("payload", ["ext::sh -c touch% {m}", "--upload-pack=touch {m}", "-b", "fd::3"])
async def test_malicious_task_inputs_never_run(tmp_path, marker, field, payload):
    remote = make_remote(tmp_path / "remotes")
    ws = tmp_path / "ws"
    ws.mkdir()
    spec = {"url": str(remote.bare), field: payload.format(m=marker)}
    with pytest.raises(GitInputError):
        await prepare(ws, GitSpec(**spec), settings=PERMISSIVE)
    assert list(ws.iterdir()) == []


async def test_runner_blocks_command_transports_even_without_the_url_check(tmp_path, marker):
    # Defence in depth: git itself refuses ext:: through GIT_ALLOW_PROTOCOL / protocol.allow.
    with pytest.raises(GitError, match="not allowed"):
        await run_git(["clone", "--", f"ext::sh -c touch% {marker}", str(tmp_path / "x")], tmp_path,
                      settings=PERMISSIVE)


async def test_push_refuses_an_agent_edited_remote(tmp_path, marker):
    remote = make_remote(tmp_path / "remotes")
    ws = tmp_path / "ws"
    git("clone", "-q", str(remote.bare), str(ws))
    git("remote", "add", "evil", f"ext::sh -c touch% {marker}", cwd=ws)
    git("config", "remote.origin.pushurl", f"ext::sh -c touch% {marker}", cwd=ws)
    for name in ("evil", "origin"):
        with pytest.raises(GitInputError, match="never allowed"):
            await push(ws, remote=name, settings=PERMISSIVE)
    with pytest.raises(GitInputError):
        await push(ws, remote="--upload-pack=touch x", settings=PERMISSIVE)
    with pytest.raises(GitInputError, match="not configured"):
        await push(ws, remote="nosuch", settings=PERMISSIVE)


async def test_run_git_timeout_kills_the_process_group(tmp_path):
    started = time.monotonic()
    with pytest.raises(GitTimeout, match="timed out"):
        await run_git(["slow"], tmp_path, config=["alias.slow=!sleep 7.25"], timeout=0.5)
    assert time.monotonic() - started < 3
    time.sleep(0.1)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert b"7.25" not in cmdline, "the child of the timed-out git survived"


def test_credentials_helper_outside_workspace_without_the_token(tmp_path):
    redactor = Redactor()
    token = "canary-credential-9f8e7d"
    with GitCredentials(token, "https://example.com", redactor=redactor) as creds:
        assert redactor.text(token) == "***"
        helper_dir = Path(creds.config[-1].split("=!", 1)[1].strip("'")).parent
        assert stat.S_IMODE(helper_dir.stat().st_mode) == 0o700
        assert not helper_dir.is_relative_to(tmp_path)
        for path in helper_dir.iterdir():
            assert token not in path.read_text()
        assert token not in " ".join(creds.config)
        assert token in creds.env.values()
    assert not helper_dir.exists()
    assert redactor.text(token) == token


def test_token_resolution_and_host_scoping():
    settings = GitSettings(token="sidecar-token", token_hosts=["github.com"])
    assert resolve_token(settings, "https://github.com/o/r", None) == "sidecar-token"
    assert resolve_token(settings, "https://evil.example/o/r", None) is None
    assert resolve_token(settings, "https://evil.example/o/r", "task-token") == "task-token"
    env_settings = GitSettings(token_env="MY_GIT_TOKEN")
    assert env_settings.default_token({"MY_GIT_TOKEN": "from-env"}) == "from-env"
    assert "sidecar-token" not in repr(settings)
