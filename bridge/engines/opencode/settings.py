"""Settings of the OpenCode HTTP engine: which server to use and how to run it headless."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ocbridge.client.mappings import deep_merge

if TYPE_CHECKING:
    from ocbridge.bridge.agent_user import AgentUser

PermissionPolicy = Literal["allow", "deny"]

# Nobody answers a question in a headless server: any rule left at "ask" hangs the session for ever.
# Everything is allowed inside the session directory; leaving it, asking the user and loop detection
# are refused so that the model gets an error instead of a hang.
DEFAULT_PERMISSION: dict[str, str] = {
    "*": "allow",
    "question": "deny",
    "doom_loop": "deny",
    "external_directory": "deny",
}

# Permissions rejected by the "allow" policy when OpenCode asks anyway (a session-level rule, a
# pattern the config did not cover...).
ALWAYS_REJECTED: frozenset[str] = frozenset({"external_directory", "question"})

# Environment switches that keep a managed server offline and quiet.
OFFLINE_SWITCHES: dict[str, str] = {
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_SHARE": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
    "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
    "OPENCODE_DISABLE_CLAUDE_CODE": "1",
}


#: The private home of an isolated OpenCode: environment variable -> folder under its state root.
_HOME_LAYOUT = {
    "HOME": "home",
    "XDG_CONFIG_HOME": "config",
    "XDG_DATA_HOME": "data",
    "XDG_CACHE_HOME": "cache",
    "XDG_STATE_HOME": "state",
}


def prepare_opencode_home(root: Path) -> None:
    """The private HOME and XDG folders an isolated OpenCode (server or ``opencode run``) uses.

    An empty ``node_modules`` in its config folder stops OpenCode from starting a background
    ``npm install @opencode-ai/plugin`` on every start.
    """
    for sub in _HOME_LAYOUT.values():
        (root / sub).mkdir(parents=True, exist_ok=True)
    plugin_dir = root / "config" / "opencode"
    (plugin_dir / "node_modules").mkdir(parents=True, exist_ok=True)
    package = plugin_dir / "package.json"
    if not package.exists():
        package.write_text("{}\n")


def mcp_remote_config(url: str, headers: dict[str, str]) -> dict[str, Any]:
    """An OpenCode ``mcp`` entry for a remote (Streamable HTTP) server. ``oauth: false``: OpenCode
    would otherwise try OAuth discovery against it before sending the headers."""
    return {"type": "remote", "url": url, "headers": dict(headers), "oauth": False}


def opencode_home_env(root: Path) -> dict[str, str]:
    """The HOME and XDG_* variables that point OpenCode at the home :func:`prepare_opencode_home` made."""
    return {name: str(root / sub) for name, sub in _HOME_LAYOUT.items()}


@dataclass(slots=True)
class OpenCodeSettings:
    """How the engine reaches OpenCode.

    With ``url`` set the engine connects to an existing ``opencode serve`` (``password`` then
    authenticates, if the server has one). Otherwise it runs a managed server: ``binary`` started
    with a private ``state_dir`` (HOME and XDG_* root; a temporary directory when ``None``), a fresh
    random password per start unless ``password`` is given, and ``config`` merged over the headless
    defaults into ``OPENCODE_CONFIG_CONTENT`` (the caller brings ``provider``/``model``).
    """

    url: str | None = None
    binary: str = "opencode"
    host: str = "127.0.0.1"
    port: int = 0
    username: str = "opencode"
    password: str | None = None
    state_dir: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    #: Which models.dev catalog OpenCode reads: "auto", "bundled", "none" or a path (see ``catalog``).
    models_catalog: str = "auto"
    # How to answer ``permission.asked``: "allow" replies "once" (but always rejects
    # external_directory and question), "deny" rejects everything.
    permission_policy: PermissionPolicy = "allow"
    startup_timeout: float = 30.0
    request_timeout: float = 30.0
    # Directory instances unused for this long are disposed (frees ~100 MiB each).
    idle_dispose_seconds: float = 300.0
    # Supervisor: first restart delay, doubled per consecutive failure up to ``restart_backoff_max``.
    restart_backoff: float = 0.5
    restart_backoff_max: float = 30.0
    # A server failing ``health_failures`` health checks in a row (one per ``health_interval``
    # seconds) is considered hung: killed and restarted.
    health_interval: float = 10.0
    health_failures: int = 3
    # Safety net of a run: poll ``GET /session/status`` this often in case the event stream missed
    # the end, and give up on a run after ``max_run_seconds`` (the pipeline normally times out first).
    status_poll_interval: float = 2.0
    max_run_seconds: float = 6 * 3600.0
    stop_timeout: float = 5.0
    extra_env: dict[str, str] = field(default_factory=dict)
    # Directories prepended to the server's PATH (ripgrep for the glob/grep tools).
    extra_path: list[str] = field(default_factory=list)
    #: The user the managed server (and so every tool command) runs as (``agent_user``).
    run_as: AgentUser | None = None

    @property
    def managed(self) -> bool:
        """Whether the engine starts and supervises its own server."""
        return self.url is None

    def opencode_config(self) -> dict[str, Any]:
        """The full inline config of a managed server: headless defaults, then ``config``."""
        defaults: dict[str, Any] = {
            "autoupdate": False,
            "share": "disabled",
            "permission": dict(DEFAULT_PERMISSION),
        }
        return deep_merge(defaults, self.config)

    def permission_reply(self, permission: str) -> Literal["once", "reject"]:
        """The reply the policy gives to a ``permission.asked`` of kind ``permission``."""
        if self.permission_policy == "deny" or permission in ALWAYS_REJECTED:
            return "reject"
        return "once"
