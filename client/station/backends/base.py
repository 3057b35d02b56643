"""The interface every backend implements: run a task, run a workspace operation, list sessions.

``opencode-nats`` goes through NATS to a sidecar; ``opencode`` (HTTP), ``opencode-cli`` and
``claudecode`` run the same pipeline in-process (they need the ``bridge`` extras). Whatever the
backend, a task ends in a :class:`~client.protocol.TaskResult` and an operation in a
:class:`~client.protocol.GitOpResult`, so the tools on top never care which one they talk to.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable

from ocbridge.client.protocol import GitOpRequest, GitOpResult, SessionState, StreamEvent, Task, TaskResult

#: Backends that run the sidecar's pipeline in this process, each named after the engine it uses.
LOCAL_ENGINES = ("opencode", "opencode-cli", "claudecode")
#: Station's ``coding.backend`` values.
BACKEND_NAMES = ("opencode-nats", *LOCAL_ENGINES)

EventCallback = Callable[[StreamEvent], Awaitable[None]]


class CodingBackend(abc.ABC):
    """Where coding work runs."""

    name: str = "backend"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect or start what the backend needs."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections and processes."""

    @abc.abstractmethod
    async def run(self, task: Task, on_event: EventCallback | None = None) -> TaskResult:
        """Run one task to its result, calling ``on_event`` for each live event."""

    @abc.abstractmethod
    async def op(self, request: GitOpRequest) -> GitOpResult:
        """Run a workspace operation (open, close, branch, commit, push, status, diff)."""

    @abc.abstractmethod
    async def sessions(self) -> list[SessionState]:
        """Known sessions, most recently used first."""

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()
