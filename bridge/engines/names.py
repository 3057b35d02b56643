"""Checks for values from the wire before an engine puts them in argv or in a URL path.

A task names its model, its agent and (through KV or ``coding_open``) its engine session id. CLIs
parse argv with yargs (OpenCode) or commander (Claude Code): a value such as ``--dangerously...`` or
``-x`` passed as a separate argv item could be read as an option. The engines therefore pass these
values as ``--option=value`` *and* check them here first; a bad value is the task's fault
(``invalid_task``), never something to send on.
"""

from __future__ import annotations

import re
import uuid

from ocbridge.client.protocol import ErrorType

from .base import EngineError

#: Model, provider and agent names: letters, digits and ``._/@:-``, not starting with ``-``.
NAME = re.compile(r"[A-Za-z0-9._/@:][A-Za-z0-9._/@:-]*")
#: OpenCode session ids (``ses_`` + base62), as they appear in ``/session/{id}`` paths.
OPENCODE_SESSION = re.compile(r"ses_[A-Za-z0-9]+")
MAX_NAME = 200


def invalid(message: str) -> EngineError:
    """The error for a value the task should not have sent."""
    return EngineError(message, error_type=ErrorType.INVALID_TASK)


def check_name(value: str, what: str) -> str:
    """``value`` when it is a plain name (model, provider/model, agent), else :func:`invalid`."""
    if not isinstance(value, str) or len(value) > MAX_NAME or not NAME.fullmatch(value):
        raise invalid(f"invalid {what} {_shown(value)}: only letters, digits and ._/@:- are allowed, "
                      "and it may not start with '-'")  # fmt: skip
    return value


def check_opencode_session(value: str) -> str:
    """``value`` when it is an OpenCode session id (``ses_...``), else :func:`invalid`."""
    if not isinstance(value, str) or len(value) > MAX_NAME or not OPENCODE_SESSION.fullmatch(value):
        raise invalid(f"invalid OpenCode session id {_shown(value)} (expected ses_ followed by letters and digits)")
    return value


def check_uuid(value: str, what: str = "Claude Code session id") -> str:
    """``value`` when it is a canonical UUID (Claude Code session ids), else :func:`invalid`."""
    try:
        if isinstance(value, str) and str(uuid.UUID(value)) == value.lower():
            return value
    except ValueError:
        pass
    raise invalid(f"invalid {what} {_shown(value)} (expected a UUID)")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
