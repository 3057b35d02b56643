"""Sidecar configuration: defaults < YAML file < ``OCBRIDGE_*`` environment < command-line flags.

Environment variables: the common settings have short names (``OCBRIDGE_NATS_URL``,
``OCBRIDGE_WORKSPACE_ROOT``, ``OCBRIDGE_CONCURRENCY``, ``OCBRIDGE_OFFLINE_MODEL``,
``OCBRIDGE_CONFIG``...); any nested key can be set with ``__`` between levels, e.g.
``OCBRIDGE_OPENCODE__IDLE_DISPOSE_SECONDS=60``. List and mapping values are given as JSON
(``OCBRIDGE_GIT__TOKEN_HOSTS='["github.com"]'``). An ``OCBRIDGE_*`` name that is no setting is an
error, as an unknown key in the file is.

The environment is read by pydantic-settings (:class:`~pydantic_settings.EnvSettingsSource`);
:class:`BridgeConfig` itself stays a plain model, so building one never reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError

from ocbridge.bridge.agent_tools.settings import AgentToolsSettings
from ocbridge.bridge.workspace.git.settings import GitSettings
from ocbridge.client.connection import NatsOptions
from ocbridge.client.mappings import deep_merge, set_path
from ocbridge.client.protocol import CleanupPolicy, Naming, OcbridgeError, describe_validation_error

ENV_PREFIX = "OCBRIDGE_"
#: The variable naming the YAML file (not a setting itself).
CONFIG_ENV = ENV_PREFIX + "CONFIG"

#: ``OCBRIDGE_*`` variables that are no setting but belong to the project's own tools, so are
#: never reported as misspelt settings: where binaries are looked for, the image's entry
#: (``OCBRIDGE_INIT=false`` skips ``ocbridge init``), ``scripts/image``, and the markers the sidecar
#: puts into its children's environment.
ENV_NOT_SETTINGS = frozenset({
    "CONFIG", "TOOLS_DIR", "INIT", "IMAGE", "IMAGE_BASE", "IMAGE_TAG", "DEBIAN_MIRROR",
    "CLI_RUN", "OPENCODE_MARKER", "GIT_SECRET", "GIT_ORIGIN", "GIT_USERNAME",
})

#: Short environment names for the settings people set most.
ENV_SHORTCUTS: dict[str, tuple[str, ...]] = {
    "NATS_URL": ("nats", "url"),
    "NATS_USER": ("nats", "user"),
    "NATS_PASSWORD": ("nats", "password"),
    "NATS_TOKEN": ("nats", "token"),
    "NATS_CREDS": ("nats", "creds_file"),
    "WORKSPACE_ROOT": ("workspace_root",),
    "CONCURRENCY": ("concurrency",),
    "OFFLINE_MODEL": ("offline_model",),
    "ENGINE": ("engine",),
    "AGENT_USER": ("agent_user",),
    "OPENCODE_URL": ("opencode", "url"),
    "OPENCODE_BINARY": ("opencode", "binary"),
    "OPENCODE_PASSWORD": ("opencode", "password"),
    "MODEL": ("opencode", "model"),
    "DATA_DIR": ("data_dir",),
    "LOG_LEVEL": ("log_level",),
    "LOG_FORMAT": ("log_format",),
    "HTTP_PORT": ("observability", "http_port"),
    "HTTP_HOST": ("observability", "http_host"),
}

LogLevel = Literal["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"]


class ConfigError(OcbridgeError, ValueError):
    """Invalid configuration; the message names the offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JetStreamSettings(Section):
    #: Seconds without an ack or progress before JetStream redelivers a task to another sidecar.
    ack_wait: float = Field(default=30.0, gt=0.5)
    #: Runs of one task that may die with their sidecar before it is given up with an error
    #: result (``redelivery_exhausted``). Give-backs that are not the task's fault (engine down,
    #: KV unavailable, a duplicate waiting for its original) do not count.
    max_attempts: int = Field(default=3, ge=1, le=100)
    #: The consumer's ``max_deliver``: a backstop on deliveries of any kind, far above what retries
    #: need; the delivery that reaches it is answered with an error result.
    max_deliveries: int = Field(default=1000, ge=10)
    #: Longest delay of a give-back that is not the task's fault, before the task is offered again
    #: (s): the first waits 0.5 s, each further delivery of the message doubles it up to this.
    retry_delay: float = Field(default=5.0, gt=0)
    #: Give-backs of one task before it is answered with an error after all (a broken store or
    #: an engine that never recovers must not keep a task forever).
    max_retries: int = Field(default=50, ge=1)
    #: Seconds a task or session lease lives without a refresh: how long the work of a sidecar
    #: that died blocks its task and session. Refreshed every third of it. It is also the leases
    #: bucket's max_age when a sidecar creates the bucket.
    lease_ttl: float = Field(default=30.0, ge=2)
    #: Largest task body accepted (bytes); a larger one gets an ``invalid_task`` error result.
    max_task_bytes: int = Field(default=1024 * 1024, ge=1024)
    #: How long an unconsumed task waits in the stream (seconds).
    max_age: float = Field(default=7 * 24 * 3600, gt=0)
    #: How long task records (status, result) are kept in the tasks bucket (seconds).
    task_record_ttl: float = Field(default=24 * 3600, gt=0)
    replicas: int = Field(default=1, ge=1, le=5)


class EmbeddedNatsSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=4222, ge=0, le=65535)


class OpenCodeConfig(Section):
    #: Use an already running ``opencode serve`` instead of starting one.
    url: str | None = None
    username: str = "opencode"
    password: SecretStr | None = None
    binary: str | None = None
    #: Default model as ``provider/model`` (a task's ``model`` wins).
    model: str | None = None
    #: Extra OpenCode config merged into the generated one (providers, agents...).
    config: dict[str, Any] = Field(default_factory=dict)
    #: The models.dev catalog OpenCode reads: ``auto`` (empty when ``config`` defines every
    #: ``enabled_providers`` entry itself), ``bundled``, ``none`` or a file path.
    models_catalog: str = Field(default="auto", min_length=1)
    idle_dispose_seconds: float = Field(default=300.0, ge=0)
    startup_timeout: float = Field(default=30.0, gt=0)
    request_timeout: float = Field(default=30.0, gt=0)
    #: How ``permission.asked`` is answered: allow once, or reject.
    permission_policy: Literal["allow", "deny"] = "allow"


class OpenCodeCLIConfig(Section):
    """The ``opencode-cli`` engine: ``opencode run --format json`` per prompt."""

    binary: str | None = None
    model: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    #: As ``opencode.models_catalog``; every run reads it, so an empty one saves ~2 s of CPU per run.
    models_catalog: str = Field(default="auto", min_length=1)


class ClaudeCodeConfig(Section):
    """The ``claudecode`` engine: ``claude -p ... --output-format stream-json`` per prompt."""

    binary: str | None = None
    model: str | None = None
    max_turns: int | None = Field(default=100, ge=1)
    allowed_tools: list[str] = Field(default_factory=list)
    disallowed_tools: list[str] = Field(default_factory=list)
    permission_mode: str | None = "acceptEdits"
    #: Extra environment for the CLI (e.g. ``ANTHROPIC_BASE_URL``); keys are never logged.
    env: dict[str, str] = Field(default_factory=dict)


class ObservabilitySettings(Section):
    """Health and metrics endpoints, and the fleet heartbeat. Tracing and OTLP export are set by
    the standard ``OTEL_*`` environment variables (off unless an exporter is named)."""

    #: Port of the HTTP listener serving ``/healthz``, ``/readyz`` and ``/metrics``; off when unset
    #: (0 picks a free port).
    http_port: int | None = Field(default=None, ge=0, le=65535)
    #: Address the listener binds: loopback unless set explicitly (``0.0.0.0`` in a container).
    http_host: str = "127.0.0.1"
    #: Seconds between this sidecar's heartbeats in KV (``ocbridge status`` reads them).
    heartbeat_interval: float = Field(default=5.0, gt=0)
    #: Seconds a heartbeat lives: a sidecar that stopped beating drops out of the fleet view.
    heartbeat_ttl: float = Field(default=15.0, ge=1)


class BridgeConfig(Section):
    """Everything ``ocbridge serve`` can be told."""

    nats: NatsOptions = Field(default_factory=NatsOptions)
    embedded_nats: EmbeddedNatsSettings = Field(default_factory=EmbeddedNatsSettings)
    naming: Naming = Field(default_factory=Naming)
    jetstream: JetStreamSettings = Field(default_factory=JetStreamSettings)
    opencode: OpenCodeConfig = Field(default_factory=OpenCodeConfig)
    opencode_cli: OpenCodeCLIConfig = Field(default_factory=OpenCodeCLIConfig)
    claudecode: ClaudeCodeConfig = Field(default_factory=ClaudeCodeConfig)
    git: GitSettings = Field(default_factory=GitSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    #: The agent's own Station tools (``station_kv_get`` ...), served over MCP to every engine.
    agent_tools: AgentToolsSettings = Field(default_factory=AgentToolsSettings)
    #: Which agent runs the prompts.
    engine: Literal["opencode", "opencode-cli", "claudecode"] = "opencode"
    #: Run the agent (its engine's processes and git in workspaces) as this user (a name or
    #: ``uid[:gid]``), apart from the sidecar's files and secrets; the sidecar must run as root.
    #: Unset: the agent runs as the sidecar's user (see the README's threat model).
    agent_user: str | None = None
    workspace_root: Path = Path("workspaces")
    #: Private state: embedded NATS data, OpenCode's HOME/XDG dirs, logs.
    data_dir: Path = Path(".ocbridge")
    concurrency: int = Field(default=2, ge=1, le=256)
    #: When a workspace is deleted, unless a task or ``open`` says otherwise.
    cleanup_policy: CleanupPolicy = "manual"
    #: Workspaces unused for this long are deleted by the sweeper (seconds; 0 turns it off).
    workspace_max_age: float = Field(default=7 * 24 * 3600, ge=0)
    sweep_interval: float = Field(default=3600, gt=0)
    #: Start the offline scripted model and point OpenCode at it (demo and tests).
    offline_model: bool = False
    #: Timeout for a task that gives none (seconds).
    default_task_timeout: float = Field(default=1800.0, gt=0)
    #: On SIGTERM, how long running tasks may go on before they are handed back for redelivery.
    shutdown_grace: float = Field(default=30.0, ge=0)
    #: After an abort (timeout/cancel), how long to wait for the engine to wind down.
    abort_grace: float = Field(default=10.0, gt=0)
    #: Text deltas are coalesced into one ``text`` event per this many seconds.
    text_flush_interval: float = Field(default=0.1, ge=0)
    #: A :mod:`logging` level name, in any case (``debug`` is ``DEBUG``).
    log_level: LogLevel = "INFO"
    #: ``json`` (one object per line, with task fields), ``text``, or ``auto``: text on a TTY,
    #: JSON otherwise.
    log_format: Literal["auto", "text", "json"] = "auto"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        # ``setup_logging`` has always accepted ``--log-level debug``.
        return value.upper() if isinstance(value, str) else value


class _EnvFields(BaseSettings, BridgeConfig):
    """:class:`BridgeConfig` as pydantic-settings reads it from ``OCBRIDGE_*`` (never instantiated)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False)


class _EnvSource(EnvSettingsSource):
    """``OCBRIDGE_*`` variables of a given mapping as nested settings.

    pydantic-settings does the prefix, the ``__`` nesting and JSON list/mapping values. Added here:
    the mapping is ``load_config``'s ``environ`` rather than ``os.environ`` (tests isolate themselves
    with ``environ={}``); the short names of :data:`ENV_SHORTCUTS`; names the stock source drops
    silently (no such setting) kept so that ``extra="forbid"`` reports them; and a value that is not
    JSON passed on as text, so that validation names the key instead of a parse error.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars(), which the base __init__ calls
        super().__init__(_EnvFields)

    def _load_env_vars(self) -> dict[str, str | None]:
        prefix = ENV_PREFIX.lower()
        found: dict[str, str | None] = {
            name.lower(): value for name, value in self._environ.items() if name.lower().startswith(prefix)
        }
        for name in ENV_NOT_SETTINGS:
            found.pop(prefix + name.lower(), None)
        # A short name wins over the ``__`` spelling of the same key.
        for short, path in ENV_SHORTCUTS.items():
            if (value := found.pop(prefix + short.lower(), None)) is not None:
                found[prefix + "__".join(path)] = value
        return found

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:  # not JSON: validation then names the key and says what it expects
            return value

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        for name, value in self.env_vars.items():
            path = tuple(name[len(ENV_PREFIX):].split("__"))
            # What the stock source ignores: no such setting, or a sub-key of a plain value.
            if path[0] not in BridgeConfig.model_fields or (len(path) > 1 and not isinstance(data.get(path[0]), dict)):
                set_path(data, path, value)
        return data


def _read_yaml(path: str | Path) -> dict[str, Any]:
    # Hand-written rather than pydantic-settings' YamlConfigSettingsSource, which skips a missing
    # file silently and lets YAML errors and a non-mapping document through as raw exceptions.
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def load_config(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> BridgeConfig:
    """Build the configuration; raises :class:`ConfigError` naming the bad key.

    ``path`` defaults to ``$OCBRIDGE_CONFIG``; ``environ`` (default ``os.environ``) supplies the
    ``OCBRIDGE_*`` variables; ``overrides`` (command-line flags) win, and their ``None`` values are
    ignored so that an unset flag keeps the lower layers' value.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_ENV)
    from_file = _read_yaml(path) if path else {}
    try:
        from_env = _EnvSource(environ)()
    except SettingsError as exc:  # any other parse failure inside pydantic-settings; names the setting
        raise ConfigError(f"invalid configuration: {exc}") from None
    data = deep_merge(from_file, from_env)
    data = deep_merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return BridgeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {describe_validation_error(exc)}") from None
