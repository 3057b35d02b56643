"""Finding an earlier session the way Station's ``--coding-session`` does: by its ID or by part of
its name or title, case-insensitively."""

from __future__ import annotations

from collections.abc import Sequence

from ocbridge.client.protocol import ErrorType, OcbridgeError, SessionState

#: Candidates listed in an error message at most.
_MAX_LISTED = 10


class SessionLookupError(OcbridgeError, LookupError):
    """No session, or more than one, matches; the message says which ones exist or match."""

    default_error_type = ErrorType.INVALID_TASK


def _describe(state: SessionState) -> str:
    title = f" {state.title!r}" if state.title else ""
    engine_id = f" [{state.opencode_id}]" if state.opencode_id else ""
    return f"{state.session_name}{title}{engine_id} (last used {state.last_used})"


def _listing(states: Sequence[SessionState]) -> str:
    shown = "; ".join(_describe(s) for s in states[:_MAX_LISTED])
    more = f"; and {len(states) - _MAX_LISTED} more" if len(states) > _MAX_LISTED else ""
    return shown + more


def find_session(sessions: Sequence[SessionState], ref: str) -> SessionState:
    """The one session ``ref`` designates.

    An exact session name or engine session ID (``ses_...``, or Claude Code's UUID) wins. An ID
    starting with ``ses_`` is only ever looked up exactly. Anything else is a case-insensitive
    fragment of the session's name or title and must match exactly one session.
    """
    ref = ref.strip()
    if not ref:
        raise SessionLookupError("existing_session_id is empty")
    exact = [s for s in sessions if ref in (s.session_name, s.opencode_id)]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        raise SessionLookupError(f"{ref!r} names {len(exact)} sessions: {_listing(exact)}")
    if ref.startswith("ses_"):
        known = f" Known sessions: {_listing(sessions)}" if sessions else " There are no sessions."
        raise SessionLookupError(f"no session has the ID {ref!r}.{known}")
    needle = ref.casefold()
    matches = [s for s in sessions
               if needle in s.session_name.casefold() or needle in (s.title or "").casefold()]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        known = f" Known sessions: {_listing(sessions)}" if sessions else " There are no sessions."
        raise SessionLookupError(f"no session name or title contains {ref!r}.{known}")
    raise SessionLookupError(
        f"{len(matches)} sessions match {ref!r}; give more of the title or the session ID: {_listing(matches)}"
    )
