"""The OpenCode HTTP engine: ``opencode serve`` driven through its HTTP API and SSE event stream."""

from .engine import OpenCodeEngine
from .server import OpenCodeProcess
from .settings import OpenCodeSettings

__all__ = ["OpenCodeEngine", "OpenCodeProcess", "OpenCodeSettings"]
