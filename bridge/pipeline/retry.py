"""Failures that are not the task's fault: the task is given back, not answered.

:func:`retry_for` is the one rule that tells them from the task's own failures.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import nats.errors
import nats.js.errors

from ocbridge.bridge.engines.base import EngineUnavailable
from ocbridge.client.protocol import ErrorType, OcbridgeError

__all__ = ["NATS_UNAVAILABLE", "RetryTask", "retry_for", "unless_unavailable"]

log = logging.getLogger(__name__)


class RetryTask(OcbridgeError):
    """Raised by the pipeline instead of returning a result when the task should run again later
    (the engine is unavailable, a KV or object-store call timed out). The JetStream worker gives
    the message back with ``nak(delay=retry_after)`` (``None``: the configured
    ``jetstream.retry_delay``); the in-process runner runs it again after that delay."""

    default_error_type = ErrorType.ENGINE_ERROR

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


#: NATS failures that say "the server is not reachable now", not "this task is wrong".
NATS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoServersError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.ServerError,
    nats.js.errors.NoStreamResponseError,
)


def retry_for(exc: BaseException) -> RetryTask | None:
    """The :class:`RetryTask` a failure calls for, or ``None`` when it is the task's own failure.

    Retried: :class:`EngineUnavailable` (after its ``retry_after``), and NATS being unreachable
    (a KV or object store call timed out, no responders, connection closed or reconnecting).
    """
    if isinstance(exc, RetryTask):
        return exc
    if isinstance(exc, EngineUnavailable):
        retry = RetryTask(f"engine unavailable: {exc.message}", retry_after=exc.retry_after)
    elif isinstance(exc, NATS_UNAVAILABLE):
        retry = RetryTask(f"NATS unavailable: {type(exc).__name__}: {exc}")
    else:
        return None
    retry.__cause__ = exc
    return retry


@contextlib.contextmanager
def unless_unavailable(what: str) -> Iterator[None]:
    """Go on when NATS is unreachable (logged once); any other failure still raises."""
    try:
        yield
    except NATS_UNAVAILABLE as exc:
        log.warning("%s failed, NATS unavailable: %s: %s", what, type(exc).__name__, exc)
