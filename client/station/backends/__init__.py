"""Backends: where Station's coding tools send their work. One interface, one result shape."""

from .base import BACKEND_NAMES, LOCAL_ENGINES, CodingBackend, EventCallback

__all__ = ["BACKEND_NAMES", "LOCAL_ENGINES", "CodingBackend", "EventCallback"]
