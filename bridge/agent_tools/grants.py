"""Who may call the tools: one unguessable bearer token per running task (or per workspace).

A CLI engine starts one agent process per run, so each run gets a token of its own. OpenCode
serve keeps one MCP connection per workspace directory for every session in it, and its tool calls
carry nothing that tells the sessions apart: there a token belongs to the directory and is shared
by the runs in it at the moment. Such a token knows the session it serves while exactly one
session runs there; with several at once, whatever needs the caller's session (its private keys,
its own session record) is refused rather than guessed.

A token stops working when the last run holding it ends: every call with it is refused. A
directory's token is then kept, inert, for ``linger`` seconds: the next run in the same directory
takes it up again, which spares registering a new one with OpenCode (``POST /mcp``, ~12 ms) per
task. OpenCode serve holds such a token in its own memory only (never in the agent's environment
or a file), and it opens nothing while no run holds it. Tokens are registered with the redaction
layer while they exist, so one that reaches a log line, an event or a result is masked.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from ocbridge.bridge.redact import Redactor

from .policy import Caller

__all__ = ["Grant", "Grants", "RunScope"]


@dataclass(frozen=True, slots=True)
class RunScope:
    """What one run of the agent serves: its task, session and workspace. No tenants exist in the
    protocol yet; when they do, a tenant belongs here and in the key policy."""

    task_id: str
    session: str
    workspace_name: str
    workspace_path: Path


@dataclass(eq=False)
class Grant:
    """A live token and the runs it serves (one, or the runs of one OpenCode directory)."""

    token: str
    shared_key: str | None = None
    runs: dict[str, RunScope] = field(default_factory=dict)
    #: When the last run let go of it (monotonic seconds), for a lingering directory token.
    idle_since: float | None = None

    @property
    def live(self) -> bool:
        return bool(self.runs)

    def caller(self) -> Caller:
        """The session calling, when the runs holding this token are of one session."""
        sessions = sorted({run.session for run in self.runs.values()})
        return Caller(sessions[0] if len(sessions) == 1 else None, tuple(sessions))


def _digest(token: str) -> bytes:
    # Looked up by digest: the table never holds the tokens themselves as keys.
    return hashlib.sha256(token.encode()).digest()


class Grants:
    """The live tokens. Not thread-safe: used from the sidecar's event loop only."""

    def __init__(self, redactor: Redactor, *, linger: float = 0.0) -> None:
        self._redactor = redactor
        self.linger = linger
        self._by_digest: dict[bytes, Grant] = {}
        self._shared: dict[str, Grant] = {}

    def __len__(self) -> int:
        """Tokens that exist (live, or lingering for their directory)."""
        return len(self._by_digest)

    @property
    def live(self) -> int:
        """Tokens some run holds now."""
        return sum(1 for grant in self._by_digest.values() if grant.live)

    def attach(self, run: RunScope, *, shared_key: str | None = None) -> Grant:
        """A token for ``run``: a new one, or (with ``shared_key``) the token of that key, live or
        lingering."""
        self._expire()
        grant = self._shared.get(shared_key) if shared_key is not None else None
        if grant is None:
            grant = Grant(secrets.token_urlsafe(32), shared_key)
            self._by_digest[_digest(grant.token)] = grant
            if shared_key is not None:
                self._shared[shared_key] = grant
            self._redactor.add(grant.token)
        grant.runs[run.task_id] = run
        grant.idle_since = None
        return grant

    def detach(self, grant: Grant, task_id: str) -> None:
        """``task_id`` ended; the token is revoked once no run holds it."""
        grant.runs.pop(task_id, None)
        if grant.runs:
            return
        if grant.shared_key is not None and self.linger > 0:
            grant.idle_since = time.monotonic()
            return
        self._revoke(grant)

    def _revoke(self, grant: Grant) -> None:
        if self._by_digest.pop(_digest(grant.token), None) is not None:
            self._redactor.remove(grant.token)
        if grant.shared_key is not None and self._shared.get(grant.shared_key) is grant:
            del self._shared[grant.shared_key]

    def _expire(self) -> None:
        """Revoke the lingering directory tokens nobody took up in time."""
        limit = time.monotonic() - self.linger
        for grant in [g for g in self._shared.values() if g.idle_since is not None and g.idle_since <= limit]:
            self._revoke(grant)

    def clear(self) -> None:
        """Revoke every token (the server stops)."""
        for grant in list(self._by_digest.values()):
            grant.runs.clear()
            self._revoke(grant)

    def lookup(self, token: str) -> Grant | None:
        """The live grant of ``token``, or ``None``."""
        if not token or len(token) > 200:
            return None
        grant = self._by_digest.get(_digest(token))
        return grant if grant is not None and grant.live else None
