"""Stopping a task early: why it stops (cancel, deadline, a lost lease), and reaping the steps."""

from __future__ import annotations

import asyncio
import logging

from ocbridge.client.protocol import TaskStatus

from .retry import RetryTask

__all__ = ["LEASE_LOST", "Stop", "reap", "relay"]

log = logging.getLogger(__name__)

LEASE_LOST = "lease_lost"


class Stop:
    """Why a task must stop early, first reason wins: ``cancelled``, ``timeout`` or a lost lease."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.event.set()

    def status(self) -> TaskStatus:
        if self.reason == LEASE_LOST:
            raise RetryTask("the session lease was lost (another sidecar may run the session now)")
        return TaskStatus(self.reason)


async def relay(cancel: asyncio.Event, stop: Stop) -> None:
    """Turn a cancel request into a stop of the task."""
    await cancel.wait()
    stop.set(TaskStatus.CANCELLED.value)


async def reap(task: asyncio.Task) -> None:
    """Cancel ``task`` and wait until it ends. Its own cancellation or failure is expected here;
    a cancellation of the caller while it waits (a second cancel) is re-raised."""
    task.cancel()
    current = asyncio.current_task()
    cancelling = current.cancelling() if current is not None else 0
    try:
        await task
    except (asyncio.CancelledError, Exception) as exc:
        if current is not None and current.cancelling() > cancelling:
            raise
        log.debug("cancelled %s ended with %r", task.get_name(), exc)
