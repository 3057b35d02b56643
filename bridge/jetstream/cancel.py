"""Cancel requests: heard on ``<cancel prefix>.<taskID>`` by every sidecar, matched to the task
wherever (and whenever) it runs."""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)


class CancelRegistry:
    """Cancel requests matched to running (or later) tasks of this sidecar.

    A request for a task that does not run here is remembered for ``ttl`` seconds, so a task
    cancelled just before this sidecar picks it up starts cancelled.
    """

    def __init__(self, ttl: float = 3600.0, *, limit: int = 10_000) -> None:
        self._ttl = ttl
        self._limit = limit
        self._requested: dict[str, float] = {}
        self._running: dict[str, asyncio.Event] = {}

    def request(self, task_id: str) -> bool:
        """Record a cancel; returns True when the task runs here."""
        now = time.monotonic()
        if len(self._requested) >= self._limit:
            # Anyone may publish cancels: remember at most ``limit``, expired ones and then the
            # oldest going first.
            self._requested = {k: t for k, t in self._requested.items() if now - t < self._ttl}
            while len(self._requested) >= self._limit:
                del self._requested[next(iter(self._requested))]
        self._requested.pop(task_id, None)
        self._requested[task_id] = now
        event = self._running.get(task_id)
        if event is not None:
            event.set()
            return True
        return False

    def start(self, task_id: str) -> asyncio.Event:
        """A task starts here: the returned event is set when it is (or already was) cancelled."""
        event = asyncio.Event()
        requested = self._requested.get(task_id)
        if requested is not None and time.monotonic() - requested < self._ttl:
            event.set()
        self._running[task_id] = event
        return event

    def finish(self, task_id: str) -> None:
        """The task is over here: forget it and any request for it."""
        self._running.pop(task_id, None)
        self._requested.pop(task_id, None)

    @property
    def running(self) -> list[str]:
        """Ids of the tasks running here."""
        return list(self._running)

    async def listen(self, nc: NATS, cancel_root: str) -> Subscription:
        """Subscribe to ``<cancel_root>.>`` and feed every request into this registry."""

        async def on_cancel(msg: Msg) -> None:
            task_id = msg.subject[len(cancel_root) + 1 :]
            if task_id and self.request(task_id):
                log.info("task %s: cancel requested", task_id)

        return await nc.subscribe(cancel_root + ".>", cb=on_cancel)
