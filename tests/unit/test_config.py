"""Configuration: YAML, OCBRIDGE_* environment and flags, with clear errors."""

import pytest

from ocbridge.bridge.config import ConfigError, load_config


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
