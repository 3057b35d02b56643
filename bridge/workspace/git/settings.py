"""Sidecar settings for the git layer (the ``git:`` key of the sidecar configuration)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator

if TYPE_CHECKING:
    from ocbridge.bridge.agent_user import AgentUser

#: Transports that can be enabled. ``ext``, ``fd`` and other remote helpers are never allowed:
#: they run arbitrary commands.
KNOWN_SCHEMES = frozenset({"https", "http", "ssh", "git"})


class GitSettings(BaseModel):
    """How the sidecar runs git: credentials, identities, timeouts and which URLs are acceptable."""

    model_config = ConfigDict(extra="forbid")

    #: Name of an environment variable holding a default token (e.g. ``GITHUB_TOKEN``).
    token_env: str | None = None
    #: A default token (a task's own token wins over it).
    token: SecretStr | None = None
    #: Hosts (``host`` or ``host:port``) the sidecar's default token, and any token a task reads from
    #: the state bucket with ``tokenFromKV``, may be sent to. Empty means any host, as in Station; set
    #: it, because a task names the URL and would otherwise receive the token. (A task's own ``token``
    #: is the task's to send where it likes.)
    token_hosts: list[str] = Field(default_factory=list)
    #: User name git sends with a token over HTTP(S) (GitHub and GitLab accept any non-empty name).
    token_username: str = "x-access-token"
    #: Author and committer of commits made by the ``commit`` operation.
    user_name: str = "opencode-bridge"
    user_email: str = "opencode-bridge@localhost"
    #: Seconds before a clone / fetch / push is killed.
    clone_timeout: float = Field(default=600.0, gt=0)
    fetch_timeout: float = Field(default=300.0, gt=0)
    push_timeout: float = Field(default=300.0, gt=0)
    #: Seconds for local commands (status, add, diff, commit, checkout).
    local_timeout: float = Field(default=120.0, gt=0)
    #: ``file://`` URLs and plain local paths (another directory on the sidecar's host) as remotes.
    allow_file_urls: bool = False
    #: Clone with ``--depth 1`` unless the task says otherwise.
    shallow: bool = False
    #: Network transports accepted in URLs. ``http`` sends tokens in clear, so it is not on by default.
    allowed_schemes: list[str] = Field(default_factory=lambda: ["https", "ssh", "git"])
    #: Largest unified diff kept for a task (bytes); longer ones are cut and marked truncated.
    max_patch_bytes: int = Field(default=8 * 1024 * 1024, ge=0)
    #: Non-git workspaces: files up to this size have their content remembered before the prompt so
    #: that line counts and a patch can be made afterwards ...
    snapshot_file_limit: int = Field(default=512 * 1024, ge=0)
    #: ... up to this many bytes in total (beyond it, changes are listed without line counts).
    snapshot_budget: int = Field(default=64 * 1024 * 1024, ge=0)
    # Not configuration: set by the sidecar from its ``agent_user`` (see :meth:`for_agent`).
    _agent: AgentUser | None = PrivateAttr(default=None)

    @property
    def agent(self) -> AgentUser | None:
        """The user git runs as in workspaces (``None``: the sidecar's own)."""
        return self._agent

    def for_agent(self, agent: AgentUser | None) -> GitSettings:
        """A copy whose git commands in workspaces run as ``agent``, and whose network operations
        go through sidecar-owned mirrors (:mod:`.mirror`)."""
        copy = self.model_copy()
        copy._agent = agent
        return copy

    @field_validator("allowed_schemes")
    @classmethod
    def _known_schemes(cls, value: list[str]) -> list[str]:
        schemes = [s.lower() for s in value]
        unknown = sorted(set(schemes) - KNOWN_SCHEMES)
        if unknown:
            raise ValueError(f"unsupported git transport(s) {unknown}; choose from {sorted(KNOWN_SCHEMES)}")
        return schemes

    def default_token(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The sidecar's own token: ``token`` or else the variable named by ``token_env``."""
        if self.token is not None and self.token.get_secret_value():
            return self.token.get_secret_value()
        if self.token_env:
            value = (os.environ if environ is None else environ).get(self.token_env)
            return value or None
        return None

    def token_allowed_for(self, url: str) -> bool:
        """Whether the sidecar's default token (or a ``tokenFromKV`` one) may be sent to the host of
        ``url``."""
        if not self.token_hosts:
            return True
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower()
            netloc = f"{host}:{parts.port}" if parts.port else host
        except ValueError:
            return False
        allowed = {h.lower() for h in self.token_hosts}
        return host in allowed or netloc in allowed


def resolve_token(
    settings: GitSettings,
    url: str,
    task_token: str | SecretStr | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The token to use for ``url``: the task's own (``token`` or a value the caller read from KV for
    ``tokenFromKV``) first, else the sidecar's default when it is allowed for that host."""
    if isinstance(task_token, SecretStr):
        task_token = task_token.get_secret_value()
    if task_token:
        return task_token
    if settings.token_allowed_for(url):
        return settings.default_token(environ)
    return None
