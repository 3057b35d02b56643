"""Workspace operations over NATS request/reply: any sidecar in the queue group answers one.

Operations (a clone, a push) can take minutes, so each request runs in its own task and never
blocks the subscription; at most ``limit`` run at once, and :meth:`OpsServer.stop` waits for them,
then cancels what is left. Replies too large for the server (a big diff) spill to the object store.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from ocbridge.bridge.logs import logged_suppress
from ocbridge.bridge.observability import tracing
from ocbridge.bridge.pipeline.ops import OpsHandler
from ocbridge.bridge.redact import Redactor
from ocbridge.client.protocol import ErrorType, GitOpRequest, GitOpResult, describe_validation_error

from .results import Publisher

log = logging.getLogger(__name__)


class OpsServer:
    """Answers :class:`GitOpRequest` s on the ops subject with :class:`GitOpResult` s."""

    def __init__(self, nc: NATS, ops: OpsHandler, redactor: Redactor, publisher: Publisher, *, limit: int = 4) -> None:
        self._nc = nc
        self._ops = ops
        self._redactor = redactor
        self._publisher = publisher
        self._slots = asyncio.Semaphore(limit)
        self._sub: Subscription | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def start(self, subject: str, queue: str) -> None:
        # Any sidecar may answer an operation: workspaces live on a volume all of them share.
        self._sub = await self._nc.subscribe(subject, queue=queue, cb=self._on_request)

    async def stop(self, grace: float) -> None:
        """Stop answering; let running operations finish within ``grace``, then cancel them."""
        if self._sub is not None:
            with logged_suppress("unsubscribing from operations", log):
                await self._sub.unsubscribe()
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)

    async def _on_request(self, msg: Msg) -> None:
        task = asyncio.create_task(self._answer(msg))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _answer(self, msg: Msg) -> None:
        try:
            request = GitOpRequest.from_wire(msg.data)
        except (ValidationError, ValueError) as exc:
            problems = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
            # ``op`` is required on the wire; an unreadable request is reported as a status failure.
            result = GitOpResult(ok=False, op="status", error=f"invalid operation: {problems}",
                                 errorType=ErrorType.INVALID_TASK)
        else:
            log.info("operation %s on %s", request.op, request.session or request.workspace)
            async with self._slots:
                with tracing.remote_parent(msg.headers):  # the caller's span, when it sent one
                    result = await self._ops.handle(request)
        if not msg.reply:
            return
        with logged_suppress(f"replying to operation {result.op}", log):
            reply = await self._publisher.encode(result.to_dict(), object_prefix=f"output/ops/{uuid.uuid4().hex}")
            await msg.respond(reply)
