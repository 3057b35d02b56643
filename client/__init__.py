"""Thin client for opencode-bridge: publish coding tasks, stream their events, await or cancel them.

Needs only nats-py and pydantic::

    from ocbridge.client import CodingClient

    async with await CodingClient.connect("nats://127.0.0.1:4222") as client:
        handle = await client.submit("add a README", workspace="demo")
        async for event in handle:
            print(event.type, event.content)
        result = await handle.result(timeout=60)

The wire contract is :mod:`ocbridge.client.protocol`; Station's coding tools, its configuration
and the MCP server are in :mod:`ocbridge.client.station`.
"""

from .client import CodingClient
from .connection import NatsOptions, TLSOptions
from .handle import TaskHandle, TaskNotFound, TaskState
from .protocol import (
    ErrorType,
    Naming,
    OcbridgeError,
    SessionState,
    StreamEvent,
    Task,
    TaskRecord,
    TaskResult,
    TaskStatus,
)

__all__ = [
    "CodingClient",
    "ErrorType",
    "Naming",
    "NatsOptions",
    "OcbridgeError",
    "SessionState",
    "StreamEvent",
    "TLSOptions",
    "Task",
    "TaskHandle",
    "TaskNotFound",
    "TaskRecord",
    "TaskResult",
    "TaskState",
    "TaskStatus",
]
