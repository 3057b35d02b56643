"""A thin typed client over the OpenCode 1.18 HTTP calls the engine needs.

Every session call carries ``?directory=``: OpenCode keys its per-directory instances (config,
tools, file watcher) by that string, so it must be the same for every call about one session.
Errors become :class:`EngineError` with the method, path and status, never the credentials.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import aiohttp

from ocbridge.bridge.engines.base import EngineError, EngineUnavailable
from ocbridge.bridge.engines.names import check_opencode_session

log = logging.getLogger(__name__)

JSON = dict[str, Any]

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_last_id_value = 0


def new_message_id() -> str:
    """An OpenCode-style ascending message id: ``msg_`` + 12 hex digits of ``ms * 4096 + counter``
    + 14 random base62 characters.

    Sending our own id with a prompt tells us which user message is ours without guessing. Like
    OpenCode's own ids it sorts after every earlier message (OpenCode orders history by id).
    """
    return _ascending_id("msg_")


def new_part_id() -> str:
    """An OpenCode-style ascending part id (``prt_``...), for the text part of a prompt: the same
    prompt sent again with the same message and part ids updates that part instead of adding the
    text a second time (OpenCode stores parts by id)."""
    return _ascending_id("prt_")


def delivery_part_id(delivery: str, session_id: str) -> str:
    """The text part id of the prompt of task message ``delivery`` in session ``session_id``: the
    same for every attempt, so a later attempt finds its prompt in the history if an earlier one
    got it there (the session id in it keeps the id unique in OpenCode's store, which keys parts
    by id alone; OpenCode only checks the ``prt`` prefix)."""
    digest = hashlib.sha256(f"{delivery}\0{session_id}".encode()).digest()
    number = int.from_bytes(digest[6:], "big")
    tail = ""
    for _ in range(14):
        number, digit = divmod(number, 62)
        tail += _BASE62[digit]
    return "prt_" + digest[:6].hex() + tail


def _ascending_id(prefix: str) -> str:
    global _last_id_value
    value = max(int(time.time() * 1000) * 0x1000, _last_id_value + 1)
    _last_id_value = value
    return prefix + format(value & 0xFFFFFFFFFFFF, "012x") + "".join(secrets.choice(_BASE62) for _ in range(14))


#: OpenCode's own SQLite store refusing a query, typically because another connection holds its
#: lock for longer than OpenCode's 5 s busy timeout. What OpenCode 1.18.33 shows of it: a run's
#: ``session.error`` "UnknownError: effect/sql/SqlError: Failed to execute statement", a 500
#: "Unexpected server error" whose logged cause is "LockTimeoutError ... SQLiteError: database is
#: locked", and from ``opencode run`` "database is locked" (see also ``opencode_cli``).
STORE_BUSY = re.compile(
    r"database (?:table )?is locked|SQLITE_BUSY|SQLITE_LOCKED|LockTimeoutError|SqlError|SQLiteError", re.IGNORECASE
)
#: How long a task waits before it is tried again after each kind of unavailability.
RETRY_SERVER = 1.0
RETRY_STORE = 2.0


class ServerUnreachable(EngineUnavailable):
    """The connection was refused or reset: typically the server died (the engine then waits for
    the supervisor's replacement and sends again)."""

    def __init__(self, message: str, *, retry_after: float = RETRY_SERVER) -> None:
        super().__init__(message, retry_after=retry_after)


def session_path(session_id: str, tail: str = "") -> str:
    """``/session/{id}{tail}`` for a checked session id: an id from KV or from the wire can never
    turn into another path (``../``, ``?``, ``#``...); a bad one is an ``invalid_task`` error."""
    return f"/session/{check_opencode_session(session_id)}{tail}"


_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]+")


def _segment(value: str) -> str:
    """One URL path segment for an id OpenCode sent us (permission and question requests): a plain
    id as it is, anything else refused (``.``/``..`` would survive quoting and move the path)."""
    if not isinstance(value, str) or not _REQUEST_ID.fullmatch(value):
        raise EngineError(f"OpenCode sent an unusable request id {quote(str(value), safe='')[:80]!r}")
    return value


class OpenCodeAPI:
    """HTTP client for one OpenCode server (the endpoint can move when the server restarts)."""

    def __init__(
        self,
        base_url: str,
        *,
        username: str = "opencode",
        password: str | None = None,
        request_timeout: float = 30.0,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._username = username
        self._headers = _auth_headers(username, password)
        self.request_timeout = request_timeout
        self._http: aiohttp.ClientSession | None = None
        #: For a managed server: the cause OpenCode logged for the ``ref`` of a 500 answer (its
        #: body only says "Unexpected server error. Check server logs for details.").
        self.explain: Callable[[str], str | None] | None = None

    # ------------------------------------------------------------------------------ plumbing

    @property
    def base_url(self) -> str:
        return self._base

    def set_endpoint(self, base_url: str, password: str | None) -> None:
        """Point the client at a (restarted) server."""
        self._base = base_url.rstrip("/")
        self._headers = _auth_headers(self._username, password)

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            # No total timeout here: each request sets its own; the event stream sets none.
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._http

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        directory: str | None = None,
        body: Any = None,
        timeout: float | None = None,
        allow_404: bool = False,
    ) -> Any:
        """Send one request and return its decoded JSON (``None`` for an empty body or a 404
        when ``allow_404``). Raises :class:`EngineError` on transport errors and HTTP errors."""
        params = {"directory": directory} if directory is not None else None
        limit = aiohttp.ClientTimeout(total=timeout or self.request_timeout)
        what = f"OpenCode {method} {path}"
        try:
            async with self._session().request(
                method, self._base + path, params=params, json=body, headers=self._headers, timeout=limit
            ) as resp:
                text = await resp.text()
                if resp.status == 404 and allow_404:
                    return None
                if resp.status == 401:
                    raise EngineError(f"{what}: authentication rejected (401); check the server password")
                if resp.status >= 500:
                    # The server failed, not the request (those are 4xx): its database locked, a
                    # proxy in front, a crash. Tried again later.
                    cause = await self._cause(text)
                    message = f"{what} failed with HTTP {resp.status}: {_excerpt(text)}{cause}"
                    busy = STORE_BUSY.search(text + cause)
                    raise EngineUnavailable(message, retry_after=RETRY_STORE if busy else RETRY_SERVER)
                if resp.status >= 400:
                    raise EngineError(f"{what} failed with HTTP {resp.status}: {_excerpt(text)}")
        except TimeoutError as exc:
            # A server that does not answer in time is hung or overloaded (the supervisor replaces
            # a hung one): not the task's fault.
            raise EngineUnavailable(f"{what} timed out after {limit.total:.1f}s", retry_after=RETRY_SERVER) from exc
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            raise ServerUnreachable(f"{what} failed: {type(exc).__name__}: {exc}") from exc
        except aiohttp.ClientError as exc:
            # ClientError messages hold host:port at most; auth travels in a header.
            raise EngineError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise EngineError(f"{what} returned invalid JSON: {_excerpt(text)}") from exc

    async def _cause(self, body: str) -> str:
        """`` (logged cause: ...)`` for a 500 answer carrying an error ``ref``, when known."""
        if self.explain is None:
            return ""
        try:
            data = json.loads(body).get("data") or {}
            ref = data.get("ref")
        except (ValueError, AttributeError):
            return ""
        if not isinstance(ref, str):
            return ""
        for _ in range(3):  # the server may answer a moment before its log line is written
            if cause := await asyncio.to_thread(self.explain, ref):
                return f" (logged cause: {_excerpt(cause)})"
            await asyncio.sleep(0.1)
        return ""

    @asynccontextmanager
    async def stream(self, path: str, *, connect_timeout: float = 10.0) -> AsyncIterator[aiohttp.ClientResponse]:
        """Open a long-lived GET (the SSE event stream); yields the response once headers arrived."""
        limit = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_connect=connect_timeout)
        what = f"OpenCode GET {path}"
        try:
            resp = await self._session().get(
                self._base + path, timeout=limit, headers={**self._headers, "Accept": "text/event-stream"}
            )
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            raise ServerUnreachable(f"{what} failed: {type(exc).__name__}: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise EngineError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
        try:
            if resp.status == 401:
                raise EngineError(f"{what}: authentication rejected (401); check the server password")
            if resp.status >= 400:
                raise EngineError(f"{what} failed with HTTP {resp.status}")
            yield resp
        finally:
            resp.release()

    # ------------------------------------------------------------------------------ calls

    async def health(self, timeout: float | None = None) -> JSON:
        """``GET /global/health`` -> ``{"healthy": true, "version": "1.18.33"}``."""
        return await self.request("GET", "/global/health", timeout=timeout)

    async def create_session(
        self, directory: str, title: str | None = None, permission: list[JSON] | None = None
    ) -> JSON:
        """Create a session in ``directory`` (which OpenCode does not validate)."""
        body: JSON = {}
        if title:
            body["title"] = title
        if permission is not None:
            body["permission"] = permission
        return await self.request("POST", "/session", directory=directory, body=body)

    async def get_session(self, directory: str, session_id: str) -> JSON | None:
        """The session's info, or ``None`` when OpenCode does not know it."""
        return await self.request("GET", session_path(session_id), directory=directory, allow_404=True)

    async def delete_session(self, directory: str, session_id: str) -> bool:
        """Delete a session; ``False`` when it did not exist."""
        result = await self.request("DELETE", session_path(session_id), directory=directory, allow_404=True)
        return bool(result)

    async def list_sessions(self, directory: str) -> list[JSON]:
        return await self.request("GET", "/session", directory=directory) or []

    async def prompt_async(
        self,
        directory: str,
        session_id: str,
        text: str,
        *,
        model: JSON | None = None,
        agent: str | None = None,
        message_id: str | None = None,
        part_id: str | None = None,
    ) -> None:
        """Queue a prompt; OpenCode answers 204 at once and reports progress as events.
        ``message_id`` and ``part_id``: the ids of the user message and its text part."""
        part: JSON = {"type": "text", "text": text}
        if part_id:
            part["id"] = part_id
        body: JSON = {"parts": [part]}
        if model is not None:
            body["model"] = model
        if agent:
            body["agent"] = agent
        if message_id:
            body["messageID"] = message_id
        await self.request("POST", session_path(session_id, "/prompt_async"), directory=directory, body=body)

    async def abort(self, directory: str, session_id: str, timeout: float | None = None) -> bool:
        path = session_path(session_id, "/abort")
        return bool(await self.request("POST", path, directory=directory, timeout=timeout))

    async def messages(self, directory: str, session_id: str) -> list[JSON]:
        """The whole history ``[{info, parts}]``, oldest first."""
        return await self.request("GET", session_path(session_id, "/message"), directory=directory) or []

    async def session_status(self, directory: str, timeout: float | None = None) -> dict[str, JSON]:
        """``{session_id: {"type": "busy" | "retry"}}``; idle sessions are absent."""
        return await self.request("GET", "/session/status", directory=directory, timeout=timeout) or {}

    async def reply_permission(self, directory: str, request_id: str, reply: str) -> bool:
        """Answer a permission request with ``once``, ``always`` or ``reject``."""
        body = {"reply": reply}
        path = f"/permission/{_segment(request_id)}/reply"
        return bool(await self.request("POST", path, directory=directory, body=body))

    async def reject_question(self, directory: str, request_id: str) -> bool:
        return bool(await self.request("POST", f"/question/{_segment(request_id)}/reject", directory=directory))

    async def mcp_status(self, directory: str) -> dict[str, JSON]:
        """The MCP servers of the directory's instance: ``{name: {"status": "connected" | ...}}``."""
        return await self.request("GET", "/mcp", directory=directory) or {}

    async def add_mcp(self, directory: str, name: str, config: JSON) -> dict[str, JSON]:
        """Add (or replace) MCP server ``name`` on the directory's instance: ``{name: {status}}``.
        The config may carry credentials in ``headers``: errors never include the body sent."""
        body = {"name": name, "config": config}
        return await self.request("POST", "/mcp", directory=directory, body=body) or {}

    async def dispose_instance(self, directory: str) -> bool:
        """Unload the directory's instance (it is loaded again on the next call about it)."""
        return bool(await self.request("POST", "/instance/dispose", directory=directory))


def _auth_headers(username: str, password: str | None) -> dict[str, str]:
    # Built by hand: aiohttp 3.14 deprecates BasicAuth objects, older versions lack the helper.
    if not password:
        return {}
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}


def _excerpt(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
