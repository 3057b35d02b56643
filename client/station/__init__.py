"""Station integration: its ``coding:`` configuration, its six coding tools, the backends they run
on, and the MCP server that offers them to any agent.

::

    from ocbridge.client.station import load_station_config, tools_from_config

    tools = tools_from_config(load_station_config("config.yaml"))
"""

from .backends import BACKEND_NAMES, LOCAL_ENGINES, CodingBackend, EventCallback
from .backends.factory import BackendError, backend_from_config, nats_backend
from .config import StationCodingConfig, StationConfigError, load_station_config, station_naming
from .tools import CodingToolError, CodingTools, ToolDefaults, tools_from_config

__all__ = [
    "BACKEND_NAMES",
    "LOCAL_ENGINES",
    "BackendError",
    "CodingBackend",
    "CodingToolError",
    "CodingTools",
    "EventCallback",
    "StationCodingConfig",
    "StationConfigError",
    "ToolDefaults",
    "backend_from_config",
    "load_station_config",
    "nats_backend",
    "station_naming",
    "tools_from_config",
]
