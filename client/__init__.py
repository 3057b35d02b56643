"""Thin client for opencode-bridge: publish coding tasks, stream their events, await or cancel them."""

from ocbridge.client.protocol import Naming, SessionState, StreamEvent, Task, TaskResult, TaskStatus

from .client import CodingClient
from .handle import TaskHandle

__all__ = ["CodingClient", "Naming", "SessionState", "StreamEvent", "Task", "TaskHandle", "TaskResult", "TaskStatus"]
