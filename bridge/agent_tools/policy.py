"""What a tool call may touch: key rules, the credential deny list, reserved and private keys.

Every check raises :class:`ToolRefused` with a message written for the agent (it becomes the text
of an MCP error result); nothing here does I/O.

Order of the checks for a key of the state bucket: shape (length, characters), reserved keys of
the bridge, the deny list and the keys this sidecar has seen used as ``tokenFromKV``, the allow
list, then private keys. The sessions bucket holds the sidecar's session records: readable (the
task's own only with ``isolate_sessions``), writable only with ``sessions_writable``.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from ocbridge.bridge.redact import Redactor
from ocbridge.client.protocol import kv_key

from .settings import RESERVED_KEYS, AgentToolsSettings

__all__ = ["Bucket", "Caller", "KeyPolicy", "ToolRefused"]

Bucket = Literal["state", "sessions"]
BUCKETS: tuple[Bucket, ...] = ("state", "sessions")


class ToolRefused(Exception):
    """A tool call that cannot be done as asked; ``str(exc)`` is shown to the agent."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls: the session a run serves, or ``None`` when the token is shared by runs of
    several sessions at once (OpenCode serves one tool connection per workspace directory)."""

    session: str | None
    sessions: tuple[str, ...] = ()


def _matches(key: str, patterns: Iterable[str]) -> bool:
    folded = key.casefold()
    return any(fnmatch.fnmatchcase(folded, pattern.casefold()) for pattern in patterns)


class KeyPolicy:
    """The rules of :class:`~.settings.AgentToolsSettings` applied to one key or value."""

    def __init__(self, settings: AgentToolsSettings, redactor: Redactor) -> None:
        self.settings = settings
        self.redactor = redactor
        self._lock = threading.Lock()
        #: Keys tasks named as ``tokenFromKV``: they hold git tokens whatever their name.
        self._token_keys: set[str] = set()

    def remember_token_key(self, key: str | None) -> None:
        """Refuse ``key`` from now on: a task read a git token from it (``tokenFromKV``)."""
        if key:
            with self._lock:
                if len(self._token_keys) < 10_000:
                    self._token_keys.add(key)

    # ------------------------------------------------------------------------------ arguments

    def bucket(self, value: Any) -> Bucket:
        """The ``bucket`` argument (``state`` when absent)."""
        if value is None:
            return "state"
        if value not in BUCKETS:
            raise ToolRefused(f'bucket must be "state" or "sessions", not {_shown(value)}')
        return value

    def key(self, value: Any, bucket: Bucket) -> str:
        """The ``key`` argument checked for shape. State keys must be plain NATS key names (what
        Station and the client read back unchanged); session names may be any printable text."""
        limit = self.settings.max_key_length
        if not isinstance(value, str) or not value:
            raise ToolRefused("key must be a non-empty string")
        if len(value) > limit:
            raise ToolRefused(f"key is {len(value)} characters long; at most {limit} are allowed")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ToolRefused("key must not contain control characters")
        if bucket == "state" and kv_key(value) != value:
            raise ToolRefused(f"invalid key {_shown(value)}: use letters, digits and -/_= in tokens separated "
                              "by single dots (no leading, trailing or double dot), not starting with b64=")
        return value

    def value(self, value: Any) -> str:
        """The ``value`` argument of a write: a string of at most ``max_value_bytes``."""
        if not isinstance(value, str):
            raise ToolRefused("value must be a string (encode structured data as JSON text)")
        size, limit = len(value.encode("utf-8", "surrogatepass")), self.settings.max_value_bytes
        if size > limit:
            raise ToolRefused(f"value is {size} bytes; at most {limit} are allowed")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ToolRefused("value must be valid Unicode text") from None
        if self.redactor.text(value) != value:
            raise ToolRefused("value looks like it holds a credential (a token, key or password); "
                              "credentials are not stored through the agent tools")
        return value

    # ------------------------------------------------------------------------------ access

    def check(self, bucket: Bucket, key: str, caller: Caller, *, write: bool) -> None:
        """Raise :class:`ToolRefused` unless ``caller`` may read (or write) ``key`` in ``bucket``."""
        if bucket == "sessions":
            self._check_session_key(key, caller, write=write)
            return
        s = self.settings
        if _matches(key, RESERVED_KEYS):
            raise ToolRefused(f"key {key!r} is reserved for the bridge")
        with self._lock:
            token_key = key in self._token_keys
        if token_key or _matches(key, s.deny_keys):
            raise ToolRefused(f"key {key!r} may hold a credential: it is not "
                              f"{'writable' if write else 'readable'} through the agent tools")
        if s.allow_keys and not _matches(key, s.allow_keys):
            raise ToolRefused(f"key {key!r} is not among the keys agents may use")
        prefix = s.private_prefix
        if prefix and key.startswith(prefix):
            if caller.session is None:
                raise ToolRefused(f"key {key!r} is private to a session, and several sessions share this "
                                  "workspace right now, so the caller's session is unknown")
            if not key.startswith(f"{prefix}{caller.session}."):
                raise ToolRefused(f"key {key!r} is private to another session (this session's private keys "
                                  f"start with {prefix}{caller.session}.)")

    def _check_session_key(self, name: str, caller: Caller, *, write: bool) -> None:
        s = self.settings
        if write and not s.sessions_writable:
            raise ToolRefused("the sessions bucket holds the bridge's session records and is read-only to "
                              "agents; use the state bucket")
        if s.isolate_sessions:
            self.own_session(name, caller)

    def own_session(self, name: str, caller: Caller) -> None:
        """With ``isolate_sessions``, refuse any session but the caller's own."""
        if not self.settings.isolate_sessions:
            return
        if caller.session is None:
            raise ToolRefused("several sessions share this workspace right now: session records cannot be "
                              "told apart, and each session may only see its own")
        if name != caller.session:
            raise ToolRefused("a session may only see its own session record here")

    def readable(self, key: str, raw: bytes) -> str:
        """A stored value as the text an agent may see: UTF-8, bounded, and refused when it holds
        anything the redaction layer would mask (a registered secret or a token shape)."""
        limit = self.settings.max_value_bytes
        if len(raw) > limit:
            raise ToolRefused(f"the value of {key!r} is {len(raw)} bytes; the agent tools return at most {limit}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ToolRefused(f"the value of {key!r} is not UTF-8 text") from None
        if self.redactor.text(text) != text:
            raise ToolRefused(f"the value of {key!r} looks like it holds a credential; it is not readable "
                              "through the agent tools")
        return text


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
