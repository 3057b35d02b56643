"""Error kinds on the wire (``errorType``) and the project's one exception root.

Every error the project raises on purpose derives from :class:`OcbridgeError` and carries its
:class:`ErrorType`; :func:`error_type_of` is the one place an exception becomes an ``errorType``.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ErrorType", "OcbridgeError", "error_type_of"]


class ErrorType(StrEnum):
    """Why a task or an operation failed. Open: the wire may carry values added later, so fields
    typed with it also accept any string."""

    INVALID_TASK = "invalid_task"
    WORKSPACE_ERROR = "workspace_error"
    GIT_ERROR = "git_error"
    ENGINE_ERROR = "engine_error"
    PROVIDER_ERROR = "provider_error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    REDELIVERY_EXHAUSTED = "redelivery_exhausted"
    INTERNAL_ERROR = "internal_error"


class OcbridgeError(Exception):
    """Root of the project's own errors: a message fit to show a user, and its :class:`ErrorType`."""

    #: The kind of failure when the raiser names none.
    default_error_type: ErrorType | str = ErrorType.INTERNAL_ERROR

    def __init__(self, message: str, error_type: ErrorType | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error_type: ErrorType | str = error_type or self.default_error_type

    def __str__(self) -> str:
        return self.message


def error_type_of(exc: BaseException) -> ErrorType | str:
    """The ``errorType`` a failure is reported with."""
    if isinstance(exc, OcbridgeError):
        return exc.error_type
    if isinstance(exc, TimeoutError):
        return ErrorType.TIMEOUT
    return ErrorType.INTERNAL_ERROR
