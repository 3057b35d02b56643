"""Thin client for opencode-bridge: publish coding tasks, stream their events, await or cancel them."""

from .client import CodingClient
from .handle import TaskHandle
from .naming import Naming
from .protocol import SessionState, StreamEvent, Task, TaskResult, TaskStatus

__all__ = ["CodingClient", "Naming", "SessionState", "StreamEvent", "Task", "TaskHandle", "TaskResult", "TaskStatus"]
