"""Configuration: YAML, OCBRIDGE_* environment and flags, with clear errors."""

import pytest

from ocbridge.bridge.config import BridgeConfig, ConfigError, load_config


def test_defaults_then_file_then_env_then_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("concurrency: 3\nworkspace_root: /srv/ws\nopencode:\n  idle_dispose_seconds: 10\n")
    env = {"OCBRIDGE_CONCURRENCY": "5", "OCBRIDGE_NATS_URL": "nats://n:4222",
           "OCBRIDGE_OPENCODE__REQUEST_TIMEOUT": "7"}
    config = load_config(cfg_file, environ=env, overrides={"offline_model": True})
    assert config.concurrency == 5
    assert str(config.workspace_root) == "/srv/ws"
    assert config.nats.url == "nats://n:4222"
    assert config.opencode.idle_dispose_seconds == 10
    assert config.opencode.request_timeout == 7
    assert config.offline_model is True
    assert load_config(cfg_file, environ=env, overrides={"concurrency": 9}).concurrency == 9


def test_config_file_from_environment(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("concurrency: 4\n")
    assert load_config(environ={"OCBRIDGE_CONFIG": str(cfg_file)}).concurrency == 4


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("concurrency: zero\n", "concurrency"),
        ("nats:\n  urll: x\n", "nats.urll"),
        ("jetstream:\n  max_attempts: 0\n", "jetstream.max_attempts"),
        ("- a list\n", "mapping"),
        ("a: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_config_names_the_key(tmp_path, text, needle):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(cfg_file, environ={})


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_secrets_do_not_show_in_repr():
    env = {"OCBRIDGE_NATS_PASSWORD": "hunter2-secret", "OCBRIDGE_OPENCODE_PASSWORD": "pw-123456"}
    config = load_config(environ=env)
    assert "hunter2" not in repr(config) and "pw-123456" not in repr(config)
    assert config.nats.password.get_secret_value() == "hunter2-secret"


def test_short_names_and_nesting_from_the_environment():
    config = load_config(environ={
        "OCBRIDGE_NATS_CREDS": "/run/creds", "OCBRIDGE_MODEL": "p/m", "OCBRIDGE_ENGINE": "claudecode",
        "OCBRIDGE_OPENCODE__IDLE_DISPOSE_SECONDS": "60", "OCBRIDGE_NATS__TLS__CA_FILE": "/ca.pem",
        "OCBRIDGE_CONFIG": "",
    })
    assert str(config.nats.creds_file) == "/run/creds" and config.opencode.model == "p/m"
    assert config.engine == "claudecode" and config.opencode.idle_dispose_seconds == 60
    assert str(config.nats.tls.ca_file) == "/ca.pem"
    # A short name wins over the ``__`` spelling of the same key.
    assert load_config(environ={"OCBRIDGE_NATS__URL": "nats://b", "OCBRIDGE_NATS_URL": "nats://a"}).nats.url == "nats://a"


def test_list_values_from_the_environment_are_json():
    config = load_config(environ={"OCBRIDGE_GIT__TOKEN_HOSTS": '["github.com", "gitlab.com"]'})
    assert config.git.token_hosts == ["github.com", "gitlab.com"]
    with pytest.raises(ConfigError, match=r"^invalid configuration: git\.token_hosts: Input should be a valid list$"):
        load_config(environ={"OCBRIDGE_GIT__TOKEN_HOSTS": "github.com"})


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("OCBRIDGE_CONCURENCY", "concurency"),
        ("OCBRIDGE_OPENCODE__IDLE_DISPOSE_SECOND", "opencode.idle_dispose_second"),
        ("OCBRIDGE_NATS__URLL", "nats.urll"),
        ("OCBRIDGE_FOO__BAR", "foo"),
    ],
)
def test_unknown_environment_names_are_errors(name, key):
    with pytest.raises(ConfigError) as caught:
        load_config(environ={name: "1"})
    assert str(caught.value) == f"invalid configuration: {key}: Extra inputs are not permitted"


def test_the_projects_own_tool_variables_are_no_misspelt_settings():
    # The image's entry, binary lookup and scripts/image read these; serve must start beside them.
    environ = {"OCBRIDGE_INIT": "false", "OCBRIDGE_TOOLS_DIR": "/opt/tools", "OCBRIDGE_IMAGE": "x",
               "OCBRIDGE_CONCURRENCY": "3"}
    assert load_config(environ=environ).concurrency == 3


def test_environment_errors_name_the_key():
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"OCBRIDGE_CONCURRENCY": "zero", "OCBRIDGE_CONCURRENCY__X": "1"})
    assert str(caught.value).startswith("invalid configuration: concurrency: Input should be a valid")
    with pytest.raises(ConfigError, match=r"^invalid configuration: jetstream\.ack_wait: Input should be greater"):
        load_config(environ={"OCBRIDGE_JETSTREAM__ACK_WAIT": "0"})


def test_log_level_is_a_level_name():
    assert load_config(environ={"OCBRIDGE_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    with pytest.raises(ConfigError, match="log_level: Input should be 'CRITICAL', 'ERROR', 'WARNING', 'INFO' or"):
        load_config(environ={"OCBRIDGE_LOG_LEVEL": "LOUD"})


def test_only_the_given_environment_is_read(monkeypatch):
    monkeypatch.setenv("OCBRIDGE_CONCURRENCY", "zero")
    assert load_config(environ={}).concurrency == 2
    # BridgeConfig is a plain model: building one never reads the environment.
    assert BridgeConfig().concurrency == 2
    assert BridgeConfig.model_validate({"concurrency": 4}).concurrency == 4
    with pytest.raises(ConfigError, match="concurrency"):
        load_config()


async def test_agent_user_is_read_from_the_environment_and_refused_in_process(tmp_path):
    from ocbridge.bridge.inprocess import LocalRunner

    config = load_config(environ={"OCBRIDGE_AGENT_USER": "agent", "OCBRIDGE_DATA_DIR": str(tmp_path)})
    assert config.agent_user == "agent"
    with pytest.raises(ConfigError, match="agent_user is a setting of `ocbridge serve`"):
        await LocalRunner(config).start()
