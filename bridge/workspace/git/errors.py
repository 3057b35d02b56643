"""Errors of the git layer. Every message is redacted when the error is made, so whatever prints,
logs or publishes it later cannot leak a token that git echoed back."""

from __future__ import annotations

from ocbridge.bridge.redact import Redactor, default_redactor
from ocbridge.client.protocol import ErrorType, OcbridgeError


class GitError(OcbridgeError):
    """A git operation failed. ``error_type`` is the task result's ``errorType``."""

    def __init__(
        self,
        message: str,
        error_type: ErrorType | str = ErrorType.GIT_ERROR,
        *,
        stderr: str = "",
        code: int | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        redactor = redactor or default_redactor
        super().__init__(redactor.text(message), error_type)
        self.stderr = redactor.text(stderr)
        self.code = code


class GitInputError(GitError):
    """A URL, branch, ref or remote from a task was refused before any git command ran."""

    def __init__(self, message: str, *, redactor: Redactor | None = None) -> None:
        super().__init__(message, ErrorType.INVALID_TASK, redactor=redactor)


class GitTimeout(GitError):
    """A git command ran longer than its configured timeout and was killed."""
