"""Build the configured engine from the sidecar configuration."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

from ..config import BridgeConfig
from .base import Engine

#: Where ``scripts/setup`` installs the pinned agent CLIs.
PROJECT_TOOLS = Path(__file__).resolve().parents[2] / ".tools" / "npm" / "node_modules" / ".bin"


def find_tool(name: str, configured: str | None = None) -> str:
    """The configured binary, else the project-local install, else ``PATH``."""
    if configured:
        return configured
    local = PROJECT_TOOLS / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found: run scripts/setup or set the binary path in the config")


def build_engine(config: BridgeConfig, *, data_dir: Path, offline_model_url: str | None = None) -> Engine:
    from .opencode.engine import OpenCodeEngine
    from .opencode.settings import OpenCodeSettings, deep_merge

    oc = config.opencode
    extra: dict = {}
    if offline_model_url:
        from ..offline_model.configs import opencode_provider_config

        extra = opencode_provider_config(offline_model_url)
    if oc.model:
        extra["model"] = oc.model
    settings = OpenCodeSettings(
        url=oc.url,
        binary=find_tool("opencode", oc.binary) if oc.url is None else "opencode",
        username=oc.username,
        password=oc.password.get_secret_value() if oc.password else None,
        state_dir=data_dir / "opencode",
        config=deep_merge(extra, oc.config),
        permission_policy=oc.permission_policy,
        startup_timeout=oc.startup_timeout,
        request_timeout=oc.request_timeout,
        idle_dispose_seconds=oc.idle_dispose_seconds,
        # ripgrep from PyPI lives next to the interpreter; OpenCode's glob/grep tools need it.
        extra_path=[sysconfig.get_path("scripts")],
    )
    return OpenCodeEngine(settings)
