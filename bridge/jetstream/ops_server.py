"""Workspace operations over NATS request/reply: any sidecar in the queue group answers one.

Operations (a clone, a push) can take minutes, so each request runs in its own task and never
blocks the subscription; :meth:`OpsServer.stop` waits for them, then cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from ocbridge.bridge.pipeline.ops import OpsHandler
from ocbridge.bridge.redact import Redactor
from ocbridge.client.protocol import ErrorType, GitOpRequest, GitOpResult, describe_validation_error

log = logging.getLogger(__name__)


class OpsServer:
    """Answers :class:`GitOpRequest` s on the ops subject with :class:`GitOpResult` s."""

    def __init__(self, nc: NATS, ops: OpsHandler, redactor: Redactor) -> None:
        self._nc = nc
        self._ops = ops
        self._redactor = redactor
        self._sub: Subscription | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def start(self, subject: str, queue: str) -> None:
        # Any sidecar may answer an operation: workspaces live on a volume all of them share.
        self._sub = await self._nc.subscribe(subject, queue=queue, cb=self._on_request)

    async def stop(self, grace: float) -> None:
        """Stop answering; let running operations finish within ``grace``, then cancel them."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
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
            result = await self._ops.handle(request)
        if msg.reply:
            payload = self._redactor.data(result.to_dict())
            with contextlib.suppress(Exception):
                await msg.respond(json.dumps(payload, separators=(",", ":")).encode())
