"""Station's ``coding:`` configuration block, read the way Station documents it (and a bit stricter).

Every key of Station's ``config.yaml`` ``coding:`` block is modelled, including those Station itself
never loads (``clone_timeout_sec``, ``push_timeout_sec``, ``workspace_base_path``,
``cleanup_policy``, ``git.*``...). Unknown keys are errors, so a typo is reported instead of being
silently ignored; ``git.token_env_var`` is accepted as a spelling of ``git.token_env`` because
Station's own docs use both. ``git.token`` expands ``${VAR}`` / ``$VAR`` from the environment.

One addition, ``coding.bridge``, holds what only opencode-bridge needs (Station ignores unknown keys,
so the same file still works for Station): see :class:`BridgeExtras`.

Environment overrides (highest precedence):

=================================== ===========================================
variable                            key
=================================== ===========================================
``STN_CODING_BACKEND``              ``coding.backend``
``STN_CODING_OPENCODE_URL``         ``coding.opencode.url``
``STN_CODING_OPENCODE_MODEL``       ``coding.opencode.model``
``STN_CODING_MAX_ATTEMPTS``         ``coding.max_attempts``
``STN_CODING_TASK_TIMEOUT_MIN``     ``coding.task_timeout_min``
``STN_NATS_URL`` (Station's name),  ``coding.nats.url``
``STN_CODING_NATS_URL``
``STN_NATS_CREDS_FILE``,            ``coding.nats.creds_file``
``STN_CODING_NATS_CREDS_FILE``
``STN_CODING_CLONE_TIMEOUT_SEC``    ``coding.clone_timeout_sec``
``STN_CODING_PUSH_TIMEOUT_SEC``     ``coding.push_timeout_sec``
``STN_CODING_WORKSPACE_BASE_PATH``  ``coding.workspace_base_path``
``STN_CODING_CLEANUP_POLICY``       ``coding.cleanup_policy``
``STN_CODING_GIT_TOKEN_ENV``        ``coding.git.token_env``
``STN_CODING_GIT_USER_NAME``        ``coding.git.user_name``
``STN_CODING_GIT_USER_EMAIL``       ``coding.git.user_email``
``STN_CODING__<KEY>__<SUBKEY>``     any key, e.g. ``STN_CODING__NATS__SUBJECTS__TASK``
=================================== ===========================================

List values given in the environment (``allowed_tools``...) are comma-separated.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from ocbridge.client.mappings import deep_merge, set_path
from ocbridge.client.protocol import CleanupPolicy, Naming, OcbridgeError, describe_validation_error

__all__ = [
    "ENV_OVERRIDES",
    "BackendName",
    "BridgeExtras",
    "StationCodingConfig",
    "StationConfigError",
    "default_config_path",
    "load_station_config",
    "relabel_errors",
    "station_naming",
]

BackendName = Literal["opencode-nats", "opencode", "opencode-cli", "claudecode"]

#: Named environment variables and the key each one sets (Station's own names first).
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "STN_CODING_BACKEND": ("backend",),
    "STN_CODING_OPENCODE_URL": ("opencode", "url"),
    "STN_CODING_OPENCODE_MODEL": ("opencode", "model"),
    "STN_CODING_MAX_ATTEMPTS": ("max_attempts",),
    "STN_CODING_TASK_TIMEOUT_MIN": ("task_timeout_min",),
    "STN_NATS_URL": ("nats", "url"),
    "STN_CODING_NATS_URL": ("nats", "url"),
    "STN_NATS_CREDS_FILE": ("nats", "creds_file"),
    "STN_CODING_NATS_CREDS_FILE": ("nats", "creds_file"),
    "STN_CODING_CLONE_TIMEOUT_SEC": ("clone_timeout_sec",),
    "STN_CODING_PUSH_TIMEOUT_SEC": ("push_timeout_sec",),
    "STN_CODING_WORKSPACE_BASE_PATH": ("workspace_base_path",),
    "STN_CODING_CLEANUP_POLICY": ("cleanup_policy",),
    "STN_CODING_GIT_TOKEN_ENV": ("git", "token_env"),
    "STN_CODING_GIT_USER_NAME": ("git", "user_name"),
    "STN_CODING_GIT_USER_EMAIL": ("git", "user_email"),
}
_GENERIC_PREFIX = "STN_CODING__"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class StationConfigError(OcbridgeError, ValueError):
    """The ``coding:`` configuration is invalid; the message names the key (``coding.nats.url: ...``)."""


class _Block(BaseModel):
    # Typos must fail loudly: Station silently ignores them, which is how misconfigurations hide.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _split_list(value: Any) -> Any:
    """``"Read, Write"`` (from an environment variable) -> ``["Read", "Write"]``."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class OpenCodeBlock(_Block):
    #: ``opencode serve`` to use; none means the bridge starts and supervises its own server.
    url: str | None = None
    #: Default model as ``provider/model``.
    model: str | None = None


class NatsSubjects(_Block):
    task: str | None = None
    #: Prefix of the per-task event subjects (``<stream>.<taskID>``).
    stream: str | None = None
    #: Prefix of the per-task result subjects (``<result>.<taskID>``).
    result: str | None = None


class NatsKV(_Block):
    sessions: str | None = None
    state: str | None = None


class NatsBlock(_Block):
    url: str | None = None
    creds_file: str | None = None
    subjects: NatsSubjects = Field(default_factory=NatsSubjects)
    kv: NatsKV = Field(default_factory=NatsKV)
    object_store: str | None = None


class CLIBlock(_Block):
    """``opencode-cli``: one ``opencode run`` per prompt."""

    binary_path: str | None = None
    timeout_sec: float | None = Field(default=None, gt=0)


class ClaudeCodeBlock(_Block):
    """``claudecode``: one ``claude -p`` per prompt."""

    binary_path: str | None = None
    timeout_sec: float | None = Field(default=None, gt=0)
    model: str | None = None
    max_turns: int | None = Field(default=None, ge=1)
    allowed_tools: list[str] = Field(default_factory=list)
    disallowed_tools: list[str] = Field(default_factory=list)

    _lists = field_validator("allowed_tools", "disallowed_tools", mode="before")(_split_list)


class GitBlock(_Block):
    """Credentials and identity for clone, commit and push."""

    #: Name of the environment variable holding the token (``token_env_var`` accepted too).
    token_env: str | None = Field(default=None, validation_alias=AliasChoices("token_env", "token_env_var"))
    #: A token; ``${VAR}`` is expanded. Prefer ``token_env``.
    token: SecretStr | None = None
    user_name: str | None = None
    user_email: str | None = None

    @field_validator("token", mode="before")
    @classmethod
    def _expand(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        environ: Mapping[str, str] = (info.context or {}).get("environ", os.environ)
        missing = [a or b for a, b in _ENV_REF.findall(value) if (a or b) not in environ]
        if missing:  # a custom error: its message carries no "Value error, " prefix
            raise PydanticCustomError(
                "env_var_unset", "environment variable {name} (referenced by the token) is not set",
                {"name": missing[0]},
            )
        return _ENV_REF.sub(lambda m: environ[m.group(1) or m.group(2)], value) or None


class BridgeExtras(_Block):
    """opencode-bridge additions under ``coding.bridge`` (not Station keys)."""

    #: Private state of the in-process backends (engine HOME dirs, session store).
    data_dir: str | None = None
    #: In-process backends start the offline scripted model and use it (demos, tests, benchmarks).
    offline_model: bool = False
    #: ``opencode-nats``: seconds to wait for a quick operation's reply (branch, commit, close...);
    #: ``open`` adds ``clone_timeout_sec`` and ``push`` adds ``push_timeout_sec``.
    op_timeout_sec: float = Field(default=60.0, gt=0)
    #: ``opencode-nats``: extra seconds to wait for a result beyond the task's own timeout.
    result_grace_sec: float = Field(default=60.0, ge=0)
    #: Extra names for NATS (``tasks_bucket``, ``stream_name``...; see ``client.naming.Naming``).
    naming: dict[str, str] = Field(default_factory=dict)
    #: Extra git settings of the in-process backends (``allow_file_urls``, ``allowed_schemes``,
    #: ``token_hosts``...; see ``bridge.gitops.GitSettings``).
    git: dict[str, Any] = Field(default_factory=dict)
    #: Any other sidecar setting for the in-process backends (``bridge.config.BridgeConfig`` keys).
    sidecar: dict[str, Any] = Field(default_factory=dict)


class StationCodingConfig(_Block):
    """Station's ``coding:`` block."""

    #: The issue makes ``opencode-nats`` (through the sidecar) the default; Station's is ``opencode``.
    backend: BackendName = "opencode-nats"
    opencode: OpenCodeBlock = Field(default_factory=OpenCodeBlock)
    nats: NatsBlock = Field(default_factory=NatsBlock)
    cli: CLIBlock = Field(default_factory=CLIBlock)
    claudecode: ClaudeCodeBlock = Field(default_factory=ClaudeCodeBlock)
    max_attempts: int = Field(default=3, ge=1, le=100)
    task_timeout_min: float = Field(default=10.0, gt=0)
    clone_timeout_sec: float | None = Field(default=None, gt=0)
    push_timeout_sec: float | None = Field(default=None, gt=0)
    workspace_base_path: str | None = None
    cleanup_policy: CleanupPolicy | None = None
    git: GitBlock = Field(default_factory=GitBlock)
    bridge: BridgeExtras = Field(default_factory=BridgeExtras)

    def task_timeout_sec(self) -> float:
        """The timeout of one ``code`` task: the CLI backends have their own ``timeout_sec``."""
        if self.backend == "opencode-cli" and self.cli.timeout_sec:
            return self.cli.timeout_sec
        if self.backend == "claudecode" and self.claudecode.timeout_sec:
            return self.claudecode.timeout_sec
        return self.task_timeout_min * 60

    def git_token(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The configured token: ``token``, else the variable named by ``token_env``."""
        if self.git.token is not None and self.git.token.get_secret_value():
            return self.git.token.get_secret_value()
        if self.git.token_env:
            return (os.environ if environ is None else environ).get(self.git.token_env) or None
        return None


# ------------------------------------------------------------------------------------------ loading


def relabel_errors(
    exc: ValidationError,
    *,
    prefix: tuple[str, ...] = (),
    unknown: str | None = None,
    notes: Mapping[tuple[str, ...], str] | None = None,
) -> ValidationError:
    """``exc`` reworded for :func:`~ocbridge.client.protocol.describe_validation_error`.

    Each location is put under ``prefix`` (``coding.`` for the ``coding:`` block); ``unknown``
    replaces pydantic's "Extra inputs are not permitted" (``unknown key (typo?)``); ``notes[loc]``
    is shown after the key it concerns (``coding.max_attempts (from STN_CODING_MAX_ATTEMPTS)``).
    """
    details: list[InitErrorDetails] = []
    for err in exc.errors(include_url=False):
        loc = tuple(str(part) for part in err["loc"])
        message = unknown if unknown and err["type"] == "extra_forbidden" else err["msg"]
        if notes and loc in notes:
            loc = (*loc[:-1], f"{loc[-1]} ({notes[loc]})")
        # A custom error without context keeps ``message`` verbatim (no ``{}`` formatting).
        details.append({"type": PydanticCustomError(err["type"], message), "loc": (*prefix, *loc),
                        "input": err["input"]})
    return ValidationError.from_exception_data(exc.title, details)


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Overrides from the environment, and which variable set each key (for error messages)."""
    data: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    generic = sorted(name for name in environ if name.startswith(_GENERIC_PREFIX))
    named = [name for name in ENV_OVERRIDES if name in environ]
    # Generic names first so that the documented specific names win.
    for name in [*generic, *named]:
        if name in ENV_OVERRIDES:
            path = ENV_OVERRIDES[name]
        else:
            path = tuple(part.lower() for part in name[len(_GENERIC_PREFIX):].split("__") if part)
            if not path:
                continue
        set_path(data, path, environ[name])
        origin[path] = name
    return data, origin


def _read_yaml(path: Path) -> Any:
    try:
        import yaml  # lazy: the client's core dependencies are only nats-py and pydantic
    except ImportError:  # pragma: no cover - pyyaml is in every extra
        raise StationConfigError(
            f"reading {path} needs PyYAML: pip install pyyaml (or 'opencode-bridge[bridge]')"
        ) from None
    try:
        return yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise StationConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise StationConfigError(f"config file {path} is not valid YAML: {exc}") from None


def _coding_block(data: Any, where: str) -> dict[str, Any]:
    """The ``coding:`` block of a whole config.yaml, or ``data`` itself when it already is one."""
    if not isinstance(data, Mapping):
        raise StationConfigError(f"{where} must hold a mapping at the top level")
    if "coding" in data:
        block = data["coding"] or {}
        if not isinstance(block, Mapping):
            raise StationConfigError("coding: must be a mapping")
        return dict(block)
    # No ``coding:`` key: it is the block itself when any key is a coding key (so its typos are
    # still caught), else a whole Station config without coding settings.
    if set(data) & set(StationCodingConfig.model_fields):
        return dict(data)
    return {}


def default_config_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """Station's config file: ``$STN_CONFIG``, else ``$XDG_CONFIG_HOME/station/config.yaml``
    (``~/.config/station/config.yaml``) when it exists."""
    environ = os.environ if environ is None else environ
    if environ.get("STN_CONFIG"):
        return Path(environ["STN_CONFIG"])
    base = Path(environ.get("XDG_CONFIG_HOME") or Path(environ.get("HOME", "~")).expanduser() / ".config")
    candidate = base / "station" / "config.yaml"
    return candidate if candidate.is_file() else None


def load_station_config(
    source: str | Path | Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> StationCodingConfig:
    """Load the ``coding:`` block from a file or a mapping (the whole config or the block alone),
    apply the environment overrides and validate. Raises :class:`StationConfigError` naming the key."""
    environ = os.environ if environ is None else environ
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        data = _coding_block(source, "the configuration")
    else:
        path = Path(source)
        data = _coding_block(_read_yaml(path), f"config file {path}")
    overrides, origin = _env_overrides(environ)
    data = deep_merge(data, overrides)
    try:
        return StationCodingConfig.model_validate(data, context={"environ": environ})
    except ValidationError as exc:
        notes = {path: f"from {name}" for path, name in origin.items()}
        problems = describe_validation_error(
            relabel_errors(exc, prefix=("coding",), unknown="unknown key (typo?)", notes=notes)
        )
        raise StationConfigError(f"invalid coding configuration: {problems}") from None


def station_naming(config: StationCodingConfig) -> Naming:
    """NATS names from ``coding.nats`` (unset ones keep the defaults), plus ``coding.bridge.naming``."""
    nats = config.nats
    names = {
        "task_subject": nats.subjects.task,
        "stream_prefix": nats.subjects.stream,
        "result_prefix": nats.subjects.result,
        "sessions_bucket": nats.kv.sessions,
        "state_bucket": nats.kv.state,
        "object_store": nats.object_store,
    }
    names = {k: v for k, v in names.items() if v}
    try:
        return Naming(**{**names, **config.bridge.naming})
    except ValidationError as exc:
        problems = describe_validation_error(
            relabel_errors(exc, prefix=("coding", "bridge", "naming"), unknown="unknown name")
        )
        raise StationConfigError(f"invalid coding configuration: {problems}") from None
