"""Settings of the agent's Station tools (the ``agent_tools:`` key of the sidecar configuration)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["DEFAULT_DENY_KEYS", "RESERVED_KEYS", "AgentToolsSettings"]

#: Keys (glob patterns, case-insensitive) never readable or writable through the tools, because
#: keys so named conventionally hold credentials: ``tokenFromKV`` reads git tokens from the same
#: state bucket. ``*key`` / ``*keys`` cover ``api-key``, ``ssh_key``, ``deploykeys``; a value that
#: merely *looks* like a credential is refused as well (see :mod:`.policy`).
DEFAULT_DENY_KEYS: tuple[str, ...] = (
    "*token*",
    "*secret*",
    "*passw*",
    "*credential*",
    "*creds*",
    "*apikey*",
    "*api_key*",
    "*api-key*",
    "*key",
    "*keys",
    "*private*key*",
    "*.pem",
    "*cookie*",
    "*oauth*",
    "*bearer*",
)

#: Keys of the state bucket the bridge itself relies on, refused whatever the configuration says:
#: workspace records (``ocbridge.workspace.<path>``, read by the cleanup sweeper) and pending
#: cancels (``cancel.<taskID>``, written by clients).
RESERVED_KEYS: tuple[str, ...] = ("ocbridge.*", "cancel.*")


class AgentToolsSettings(BaseModel):
    """``station_kv_get``, ``station_kv_set`` and ``station_session_info`` for the coding agent.

    The sidecar serves them over MCP on a loopback port and hands every run of the agent a URL
    and a bearer token that only work while its task runs and only for that task.
    """

    model_config = ConfigDict(extra="forbid")

    #: Serve the tools to the agent (every engine).
    enabled: bool = True
    #: MCP server name the agent sees: OpenCode calls the tools ``<name>_station_kv_get``, Claude
    #: Code ``mcp__<name>__station_kv_get``.
    server_name: str = Field(default="station", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
    #: Address and port of the MCP listener (loopback: the agent runs on the same host; 0 = any
    #: free port).
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    #: Keys of the state bucket refused to read and write (glob patterns, case-insensitive);
    #: setting it replaces the defaults.
    deny_keys: list[str] = Field(default_factory=lambda: list(DEFAULT_DENY_KEYS))
    #: When not empty, only keys matching one of these patterns are reachable (still minus
    #: ``deny_keys``): the strict mode for operators who know which keys agents share.
    allow_keys: list[str] = Field(default_factory=list)
    #: Per-session keys: a key ``<private_prefix><session>.<rest>`` of the state bucket belongs to
    #: session ``<session>``; any other session (and a run that cannot tell which session it
    #: serves) gets an error for it. ``None``: no private keys.
    private_prefix: str | None = Field(default=None, pattern=r"^[-/_=a-zA-Z0-9.]{1,64}$")
    #: The sessions bucket and ``station_session_info`` show a task its own session only.
    isolate_sessions: bool = False
    #: Whether ``station_kv_set`` may write the sessions bucket (the sidecar's session records,
    #: which Station reads back); off, it is read-only to agents.
    sessions_writable: bool = False
    #: Longest key (characters) and value (UTF-8 bytes) the tools accept.
    max_key_length: int = Field(default=256, ge=8, le=1024)
    max_value_bytes: int = Field(default=64 * 1024, ge=16, le=512 * 1024)
    #: OpenCode serve: how long a workspace's token outlives its last run, inert (every call with
    #: it is refused), so that the next task there takes it up without registering a new one.
    linger_seconds: float = Field(default=300.0, ge=0)
    #: Seconds a tool call may spend on NATS or git before it answers with an error.
    call_timeout: float = Field(default=10.0, gt=0)

    @field_validator("deny_keys", "allow_keys")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern or len(pattern) > 256:
                raise ValueError("patterns must be 1 to 256 characters")
        return value
