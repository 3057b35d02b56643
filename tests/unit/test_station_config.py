"""Station's ``coding:`` block: every key read, environment overrides, typos and bad values reported
with the key's full name, and the mapping onto the NATS names and the in-process sidecar config."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from ocbridge.bridge.config import load_config
from ocbridge.bridge.inprocess.backends import LocalBackend, local_bridge_config
from ocbridge.client.protocol import describe_validation_error
from ocbridge.client.station.backends.factory import backend_from_config
from ocbridge.client.station.backends.nats import NatsBackend
from ocbridge.client.station.config import (
    ENV_OVERRIDES,
    StationConfigError,
    default_config_path,
    load_station_config,
    relabel_errors,
    station_naming,
)
from ocbridge.client.station.tools import defaults_from_config

FULL = """
ai_provider: openai          # a whole Station config: other blocks are ignored
coding:
  backend: claudecode
  opencode:
    url: http://127.0.0.1:4096
    model: anthropic/claude-sonnet-4
  nats:
    url: nats://nats.example:4222
    creds_file: /etc/nats/station.creds
    subjects:
      task: acme.coding.task
      stream: acme.coding.stream
      result: acme.coding.result
    kv:
      sessions: acme-sessions
      state: acme-state
    object_store: acme-files
  cli:
    binary_path: /opt/opencode
    timeout_sec: 240
  claudecode:
    binary_path: /opt/claude
    timeout_sec: 300
    model: sonnet
    max_turns: 12
    allowed_tools: [Read, Write, Bash]
    disallowed_tools: [WebFetch]
  max_attempts: 4
  task_timeout_min: 15
  clone_timeout_sec: 200
  push_timeout_sec: 90
  workspace_base_path: /tmp/station-coding
  cleanup_policy: on_success
  git:
    token_env: GITHUB_TOKEN
    user_name: Station Bot
    user_email: bot@example.com
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def error_of(source, environ=None) -> str:
    with pytest.raises(StationConfigError) as info:
        load_station_config(source, environ or {})
    return str(info.value)


def test_every_key_of_the_coding_block_is_read(tmp_path):
    c = load_station_config(write(tmp_path, FULL), {})
    assert c.backend == "claudecode"
    assert (c.opencode.url, c.opencode.model) == ("http://127.0.0.1:4096", "anthropic/claude-sonnet-4")
    assert (c.nats.url, c.nats.creds_file) == ("nats://nats.example:4222", "/etc/nats/station.creds")
    assert (c.nats.subjects.task, c.nats.subjects.stream, c.nats.subjects.result) == (
        "acme.coding.task", "acme.coding.stream", "acme.coding.result")
    assert (c.nats.kv.sessions, c.nats.kv.state, c.nats.object_store) == ("acme-sessions", "acme-state", "acme-files")
    assert (c.cli.binary_path, c.cli.timeout_sec) == ("/opt/opencode", 240)
    cc = c.claudecode
    assert (cc.binary_path, cc.timeout_sec, cc.model, cc.max_turns) == ("/opt/claude", 300, "sonnet", 12)
    assert (cc.allowed_tools, cc.disallowed_tools) == (["Read", "Write", "Bash"], ["WebFetch"])
    assert (c.max_attempts, c.task_timeout_min, c.clone_timeout_sec, c.push_timeout_sec) == (4, 15, 200, 90)
    assert (c.workspace_base_path, c.cleanup_policy) == ("/tmp/station-coding", "on_success")
    assert (c.git.token_env, c.git.user_name, c.git.user_email) == ("GITHUB_TOKEN", "Station Bot", "bot@example.com")
    # claudecode has its own timeout; the others use task_timeout_min.
    assert c.task_timeout_sec() == 300
    assert c.model_copy(update={"backend": "opencode"}).task_timeout_sec() == 15 * 60
    assert c.model_copy(update={"backend": "opencode-cli"}).task_timeout_sec() == 240


def test_block_alone_whole_config_without_coding_and_defaults(tmp_path):
    assert load_station_config({"backend": "opencode"}, {}).backend == "opencode"
    whole = load_station_config({"ai_provider": "openai", "mcp_port": 8586}, {})
    assert whole.backend == "opencode-nats" and whole.task_timeout_min == 10 and whole.max_attempts == 3
    assert load_station_config(None, {}).backend == "opencode-nats"


def test_token_env_var_spelling_and_token_expansion():
    c = load_station_config({"git": {"token_env_var": "MY_TOKEN"}}, {})
    assert c.git.token_env == "MY_TOKEN"
    assert c.git_token({"MY_TOKEN": "t0k"}) == "t0k"
    c = load_station_config({"git": {"token": "${GH}-x", "token_env": "OTHER"}}, {"GH": "ghp_abc"})
    assert c.git_token({}) == "ghp_abc-x"  # an explicit token wins over token_env
    assert "ghp_abc" not in repr(c)  # a SecretStr: never in reprs or logs
    assert error_of({"git": {"token": "${NOT_SET}"}}) == (
        "invalid coding configuration: coding.git.token: environment variable NOT_SET "
        "(referenced by the token) is not set"
    )


@pytest.mark.parametrize(
    ("block", "key"),
    [
        ({"backnd": "opencode"}, "coding.backnd: unknown key (typo?)"),
        ({"nats": {"subjects": {"taks": "x"}}}, "coding.nats.subjects.taks: unknown key (typo?)"),
        ({"claudecode": {"max_turn": 3}}, "coding.claudecode.max_turn: unknown key (typo?)"),
        ({"git": {"user": "me"}}, "coding.git.user: unknown key (typo?)"),
        ({"backend": "cursor"}, "coding.backend: Input should be 'opencode-nats', 'opencode'"),
        ({"cleanup_policy": "always"}, "coding.cleanup_policy: Input should be 'on_session_end'"),
        ({"max_attempts": 0}, "coding.max_attempts: Input should be greater than or equal to 1"),
        ({"task_timeout_min": "soon"}, "coding.task_timeout_min: Input should be a valid number"),
        ({"nats": {"subjects": {"task": 5}}}, "coding.nats.subjects.task: Input should be a valid string"),
        ({"bridge": {"op_timeout_sec": -1}}, "coding.bridge.op_timeout_sec: Input should be greater than 0"),
    ],
)
def test_invalid_values_name_the_key(block, key):
    assert key in error_of({"coding": block})


def test_several_problems_are_all_reported():
    message = error_of({"backend": "x", "claudecode": {"max_turns": 0}})
    assert "coding.backend:" in message and "coding.claudecode.max_turns:" in message


def test_file_errors_are_clear(tmp_path):
    assert "is not valid YAML" in error_of(write(tmp_path, "coding: [unclosed"))
    assert "must hold a mapping" in error_of(write(tmp_path, "- a\n- b\n"))
    assert "coding: must be a mapping" in error_of(write(tmp_path, "coding: 3\n"))
    assert "cannot read config file" in error_of(tmp_path / "missing.yaml")


def test_named_environment_overrides_win_over_the_file(tmp_path):
    environ = {
        "STN_CODING_BACKEND": "opencode",
        "STN_CODING_OPENCODE_URL": "http://oc:1",
        "STN_CODING_OPENCODE_MODEL": "p/m",
        "STN_CODING_MAX_ATTEMPTS": "7",
        "STN_CODING_TASK_TIMEOUT_MIN": "2.5",
        "STN_NATS_URL": "nats://station:4222",
        "STN_NATS_CREDS_FILE": "/creds",
        "STN_CODING_CLONE_TIMEOUT_SEC": "11",
        "STN_CODING_PUSH_TIMEOUT_SEC": "12",
        "STN_CODING_WORKSPACE_BASE_PATH": "/ws",
        "STN_CODING_CLEANUP_POLICY": "manual",
        "STN_CODING_GIT_TOKEN_ENV": "TOK",
        "STN_CODING_GIT_USER_NAME": "Env Bot",
        "STN_CODING_GIT_USER_EMAIL": "env@example.com",
    }
    c = load_station_config(write(tmp_path, FULL), environ)
    assert (c.backend, c.opencode.url, c.opencode.model) == ("opencode", "http://oc:1", "p/m")
    assert (c.max_attempts, c.task_timeout_min) == (7, 2.5)
    assert (c.nats.url, c.nats.creds_file) == ("nats://station:4222", "/creds")
    assert (c.clone_timeout_sec, c.push_timeout_sec, c.workspace_base_path, c.cleanup_policy) == (
        11, 12, "/ws", "manual")
    assert (c.git.token_env, c.git.user_name, c.git.user_email) == ("TOK", "Env Bot", "env@example.com")
    # Untouched keys keep the file's values.
    assert c.nats.subjects.task == "acme.coding.task"
    # Every documented variable was exercised (the STN_CODING_NATS_* aliases below).
    assert set(ENV_OVERRIDES) - set(environ) == {"STN_CODING_NATS_URL", "STN_CODING_NATS_CREDS_FILE"}


def test_alias_and_generic_environment_names():
    c = load_station_config({}, {"STN_CODING_NATS_URL": "nats://a:1", "STN_CODING_NATS_CREDS_FILE": "/c",
                                 "STN_CODING__NATS__SUBJECTS__TASK": "env.task",
                                 "STN_CODING__CLAUDECODE__ALLOWED_TOOLS": "Read, Edit"})
    assert (c.nats.url, c.nats.creds_file, c.nats.subjects.task) == ("nats://a:1", "/c", "env.task")
    assert c.claudecode.allowed_tools == ["Read", "Edit"]
    # The documented specific name wins over the generic form of the same key.
    c = load_station_config({}, {"STN_CODING__BACKEND": "claudecode", "STN_CODING_BACKEND": "opencode-cli"})
    assert c.backend == "opencode-cli"


def test_environment_errors_name_the_variable():
    assert error_of({}, {"STN_CODING_MAX_ATTEMPTS": "many"}).startswith(
        "invalid coding configuration: coding.max_attempts (from STN_CODING_MAX_ATTEMPTS): Input should be")
    assert "coding.nats.subjects.tsk (from STN_CODING__NATS__SUBJECTS__TSK): unknown key" in error_of(
        {}, {"STN_CODING__NATS__SUBJECTS__TSK": "x"})


def test_default_config_path(tmp_path):
    assert default_config_path({"STN_CONFIG": "/x/config.yaml"}) == Path("/x/config.yaml")
    assert default_config_path({"HOME": str(tmp_path)}) is None
    station = tmp_path / ".config" / "station"
    station.mkdir(parents=True)
    (station / "config.yaml").write_text(FULL)
    assert default_config_path({"HOME": str(tmp_path)}) == station / "config.yaml"


def test_nats_names_and_backend(tmp_path):
    c = load_station_config(write(tmp_path, FULL), {"STN_CODING_BACKEND": "opencode-nats"})
    naming = station_naming(c)
    assert (naming.task_subject, naming.stream_subject("t1"), naming.result_subject("t1")) == (
        "acme.coding.task", "acme.coding.stream.t1", "acme.coding.result.t1")
    assert (naming.sessions_bucket, naming.state_bucket, naming.object_store) == (
        "acme-sessions", "acme-state", "acme-files")
    assert naming.ops_subject == "acme.coding.task.ops"
    backend = backend_from_config(c)
    assert isinstance(backend, NatsBackend)
    assert (backend.options.url, str(backend.options.creds_file)) == ("nats://nats.example:4222",
                                                                      "/etc/nats/station.creds")
    assert (backend.clone_timeout, backend.push_timeout, backend.max_attempts) == (200, 90, 4)
    assert backend.default_task_timeout == 15 * 60
    # Unset names keep Station's defaults; coding.bridge.naming adds the bridge's own.
    plain = station_naming(load_station_config({"bridge": {"naming": {"tasks_bucket": "tb"}}}, {}))
    assert (plain.task_subject, plain.sessions_bucket, plain.tasks_bucket) == (
        "station.coding.task", "opencode-sessions", "tb")
    with pytest.raises(StationConfigError, match=r"coding\.bridge\.naming\.tasks: unknown name"):
        station_naming(load_station_config({"bridge": {"naming": {"tasks": "x"}}}, {}))


def test_tool_defaults_follow_the_backend(tmp_path):
    environ = {"STN_CODING_BACKEND": "opencode-nats", "GITHUB_TOKEN": "ghp_1"}
    c = load_station_config(write(tmp_path, FULL), environ)
    nats = defaults_from_config(c, environ)
    assert (nats.task_timeout, nats.cleanup_policy, nats.model) == (900, "on_success", "anthropic/claude-sonnet-4")
    # A sidecar gets Station's token with each clone and push (git.token_env names the variable) ...
    assert nats.git_token == "ghp_1"
    assert defaults_from_config(c, {}).git_token is None
    # ... in-process backends read it from their own git settings.
    local = defaults_from_config(c.model_copy(update={"backend": "claudecode"}), environ)
    assert (local.task_timeout, local.git_token, local.model) == (300, None, None)


@pytest.mark.parametrize("backend", ["opencode", "opencode-cli", "claudecode"])
def test_local_backends_get_every_station_key(tmp_path, backend):
    c = load_station_config(write(tmp_path, FULL), {"STN_CODING_BACKEND": backend})
    overrides = local_bridge_config(c, backend)
    config = load_config(overrides=overrides, environ={})  # the sidecar accepts every mapped key
    assert config.engine == backend
    assert config.workspace_root == Path("/tmp/station-coding")
    assert config.cleanup_policy == "on_success"
    assert config.jetstream.max_attempts == 4
    assert (config.opencode.url, config.opencode.model) == ("http://127.0.0.1:4096", "anthropic/claude-sonnet-4")
    assert config.opencode_cli.binary == "/opt/opencode"
    cc = config.claudecode
    assert (cc.binary, cc.model, cc.max_turns) == ("/opt/claude", "sonnet", 12)
    assert (cc.allowed_tools, cc.disallowed_tools) == (["Read", "Write", "Bash"], ["WebFetch"])
    git = config.git
    assert (git.token_env, git.user_name, git.user_email) == ("GITHUB_TOKEN", "Station Bot", "bot@example.com")
    assert (git.clone_timeout, git.push_timeout) == (200, 90)
    assert config.default_task_timeout == c.task_timeout_sec()
    assert isinstance(backend_from_config(c), LocalBackend)


def test_bridge_additions_reach_the_local_sidecar_config(tmp_path):
    c = load_station_config({"backend": "opencode", "git": {"token": "${T}"}, "bridge": {
        "data_dir": str(tmp_path / "d"), "offline_model": True,
        "git": {"allow_file_urls": True, "allowed_schemes": ["http"]},
        "sidecar": {"concurrency": 3, "git": {"user_name": "Override"}},
    }}, {"T": "tok"})
    config = load_config(overrides=local_bridge_config(c, "opencode"), environ={})
    assert (config.data_dir, config.offline_model, config.concurrency) == (tmp_path / "d", True, 3)
    assert (config.git.allow_file_urls, config.git.allowed_schemes) == (True, ["http"])
    assert config.git.token.get_secret_value() == "tok"
    assert config.git.user_name == "Override"  # coding.bridge.sidecar wins
    # Unset Station keys leave the sidecar's defaults alone.
    defaults = load_config(overrides=local_bridge_config(load_station_config({}, {}), "opencode"), environ={})
    assert defaults.git.clone_timeout == 600 and defaults.cleanup_policy == "manual"
    with pytest.raises(StationConfigError, match="does not run in-process"):
        local_bridge_config(c, "opencode-nats")


def test_relabelled_errors_keep_every_problem_and_its_wording():
    class Block(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n: int
        d: dict[str, int] = {}

    with pytest.raises(ValidationError) as caught:
        Block.model_validate({"n": "x", "d": {"k": "y"}, "typo": 1})
    # Messages are kept verbatim: braces are not format fields.
    relabelled = relabel_errors(caught.value, prefix=("coding",), unknown="unknown {key}", notes={("n",): "from N"})
    assert describe_validation_error(relabelled) == (
        "coding.n (from N): Input should be a valid integer, unable to parse string as an integer; "
        "coding.d.k: Input should be a valid integer, unable to parse string as an integer; "
        "coding.typo: unknown {key}"
    )
    assert [e["type"] for e in relabelled.errors()] == ["int_parsing", "int_parsing", "extra_forbidden"]
