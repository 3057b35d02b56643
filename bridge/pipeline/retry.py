"""Failures that are not the task's fault: the task is given back, not answered."""

from __future__ import annotations

from ocbridge.client.protocol import ErrorType, OcbridgeError

__all__ = ["RetryTask"]


class RetryTask(OcbridgeError):
    """Raised by the pipeline instead of returning a result when the task should run again later
    (the engine is unavailable, a KV or object-store call timed out). The JetStream worker gives
    the message back with ``nak(delay=retry_after)``; the in-process runner reports an error."""

    default_error_type = ErrorType.ENGINE_ERROR

    def __init__(self, message: str, *, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
