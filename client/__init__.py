"""Thin client for opencode-bridge: publish coding tasks, stream their events, await or cancel them."""

from ocbridge.client.protocol.models import SessionState, StreamEvent, Task, TaskResult, TaskStatus
from ocbridge.client.protocol.naming import Naming

from .client import CodingClient
from .handle import TaskHandle

__all__ = ["CodingClient", "Naming", "SessionState", "StreamEvent", "Task", "TaskHandle", "TaskResult", "TaskStatus"]
