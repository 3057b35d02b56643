"""Build the configured engine from the sidecar configuration."""

from __future__ import annotations

import logging
import sysconfig
from pathlib import Path

from ..config import BridgeConfig
from ..logs import logged_suppress
from ..processes import find_binary
from .base import Engine

log = logging.getLogger(__name__)

def build_engine(config: BridgeConfig, *, data_dir: Path, offline_model_url: str | None = None) -> Engine:
    """The engine ``config.engine`` names, wired to the offline model when one runs, and run as
    the agent's user when ``config.git.agent`` is set (the sidecar sets it from ``agent_user``)."""
    # ripgrep from PyPI lives next to the interpreter; OpenCode's glob/grep tools need it.
    scripts = [sysconfig.get_path("scripts")]
    if config.engine == "claudecode":
        return _claude(config, data_dir, offline_model_url, scripts)
    from ocbridge.client.mappings import deep_merge

    extra: dict = {}
    if offline_model_url:
        from ..offline_model.configs import opencode_provider_config

        extra = opencode_provider_config(offline_model_url)
    if config.engine == "opencode-cli":
        from .cli.opencode_cli import OpenCodeCLIEngine, OpenCodeCLISettings

        cli = config.opencode_cli
        return OpenCodeCLIEngine(OpenCodeCLISettings(
            binary=_tool("opencode", cli.binary), state_dir=data_dir / "opencode-cli",
            config=deep_merge(extra, cli.config), model=cli.model or config.opencode.model, extra_path=scripts,
            models_catalog=cli.models_catalog, run_as=config.git.agent,
        ))

    from .opencode.engine import OpenCodeEngine
    from .opencode.settings import OpenCodeSettings

    oc = config.opencode
    if oc.model:
        extra["model"] = oc.model
    return OpenCodeEngine(OpenCodeSettings(
        url=oc.url,
        binary=_tool("opencode", oc.binary) if oc.url is None else "opencode",
        username=oc.username,
        password=oc.password.get_secret_value() if oc.password else None,
        state_dir=data_dir / "opencode",
        config=deep_merge(extra, oc.config),
        models_catalog=oc.models_catalog,
        permission_policy=oc.permission_policy,
        startup_timeout=oc.startup_timeout,
        request_timeout=oc.request_timeout,
        idle_dispose_seconds=oc.idle_dispose_seconds,
        extra_path=scripts,
        run_as=config.git.agent,
    ))


def _tool(name: str, configured: str | None) -> str:
    """A configured binary as it is (the engine checks it when it starts), else where
    :func:`find_binary` finds ``name`` (``$OCBRIDGE_TOOLS_DIR``, the checkout's ``.tools``, PATH...)."""
    return configured or find_binary(name)


def _claude(config: BridgeConfig, data_dir: Path, offline_model_url: str | None, scripts: list[str]) -> Engine:
    from .cli.claudecode import ClaudeCodeEngine, ClaudeCodeSettings

    cc = config.claudecode
    env = dict(cc.env)
    if offline_model_url:
        from ..offline_model.configs import claude_env

        env = {**claude_env(offline_model_url), **env}
    return ClaudeCodeEngine(ClaudeCodeSettings(
        binary=_tool("claude", cc.binary), state_dir=data_dir / "claudecode", env=env, model=cc.model,
        max_turns=cc.max_turns, allowed_tools=cc.allowed_tools, disallowed_tools=cc.disallowed_tools,
        permission_mode=cc.permission_mode, extra_path=scripts, run_as=config.git.agent,
    ))


class EngineHost:
    """The configured engine, plus the offline model it talks to when ``config.offline_model`` is set.

    Shared by the sidecar and the in-process runner: ``await host.start()`` ... ``await host.aclose()``.
    """

    def __init__(self, config: BridgeConfig, *, data_dir: Path, engine: Engine | None = None) -> None:
        self.config = config
        self.data_dir = data_dir
        self.engine = engine
        self._offline_model = None

    async def start(self) -> Engine:
        offline_url = None
        if self.config.offline_model and self.engine is None:  # only an engine built here can use it
            from ..offline_model.server import OfflineModelServer

            self._offline_model = OfflineModelServer()
            offline_url = await self._offline_model.start()
            log.info("offline model at %s", offline_url)
        if self.engine is None:
            self.engine = build_engine(self.config, data_dir=self.data_dir, offline_model_url=offline_url)
        await self.engine.start()
        return self.engine

    async def aclose(self) -> None:
        """Stop the engine (reaping its processes) and the offline model; never raises."""
        if self.engine is not None:
            with logged_suppress(f"stopping the {self.engine.name} engine", log):
                await self.engine.aclose()
        if self._offline_model is not None:
            with logged_suppress("stopping the offline model", log):
                await self._offline_model.stop()
            self._offline_model = None
