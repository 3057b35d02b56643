"""Station's own tools for the coding agent, served by the sidecar over MCP: ``station_kv_get``,
``station_kv_set`` and ``station_session_info``.

:class:`AgentToolsServer` listens on loopback inside the sidecar; around each run the pipeline asks
it for a :class:`~ocbridge.bridge.engines.base.ToolServer` (URL plus a per-task bearer token) that
the engine wires into the agent. Modules: :mod:`.settings` (``agent_tools:`` config),
:mod:`.policy` (key rules, deny list, private keys), :mod:`.grants` (tokens), :mod:`.tools` (the
three tools), :mod:`.protocol` (MCP JSON-RPC), :mod:`.server` (the HTTP endpoint).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .settings import DEFAULT_DENY_KEYS, RESERVED_KEYS, AgentToolsSettings

if TYPE_CHECKING:
    from .grants import Grant, Grants, RunScope
    from .policy import Caller, KeyPolicy, ToolRefused
    from .protocol import Dispatcher, ToolResult, ToolSpec
    from .server import AgentToolsServer
    from .tools import KV_GET, KV_SET, SESSION_INFO, StationTools

# The sidecar's configuration imports the settings; the rest (aiohttp, stores, engines) loads on
# first use, so that importing the configuration never imports the engines (which import it).
_LAZY = {
    "Grant": "grants", "Grants": "grants", "RunScope": "grants",
    "Caller": "policy", "KeyPolicy": "policy", "ToolRefused": "policy",
    "Dispatcher": "protocol", "ToolResult": "protocol", "ToolSpec": "protocol",
    "AgentToolsServer": "server",
    "KV_GET": "tools", "KV_SET": "tools", "SESSION_INFO": "tools", "StationTools": "tools",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_DENY_KEYS",
    "KV_GET",
    "KV_SET",
    "RESERVED_KEYS",
    "SESSION_INFO",
    "AgentToolsServer",
    "AgentToolsSettings",
    "Caller",
    "Dispatcher",
    "Grant",
    "Grants",
    "KeyPolicy",
    "RunScope",
    "StationTools",
    "ToolRefused",
    "ToolResult",
    "ToolSpec",
]
