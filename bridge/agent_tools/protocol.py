"""MCP over JSON-RPC 2.0, the part a tools-only server needs; no I/O.

The Streamable HTTP transport (MCP 2025-03-26 and later) carries one JSON-RPC message, or a batch,
per ``POST``; a server may answer requests with plain ``application/json`` instead of an SSE stream,
and answers notifications with ``202 Accepted``. This module turns a request body into that HTTP
answer: ``initialize``, ``ping``, ``tools/list`` and ``tools/call``; ``notifications/*`` are
accepted and ignored. The server is stateless (no ``Mcp-Session-Id``): every call carries its
bearer token, which says which task it serves.

Errors follow the MCP split: a malformed message, an unknown method or an unknown tool is a
JSON-RPC error; a tool that fails or refuses its arguments answers a *result* with
``isError: true``, which the agent sees and can correct.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ocbridge.client.protocol.body import MAX_DEPTH, nesting_depth

__all__ = [
    "PROTOCOL_VERSIONS",
    "Dispatcher",
    "HttpAnswer",
    "ToolResult",
    "ToolSpec",
]

log = logging.getLogger(__name__)

#: What a body too deep for the JSON parser itself parses to here.
_TOO_DEEP = object()

#: Protocol revisions this server speaks, newest first (the tools-only subset is the same in all).
PROTOCOL_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

#: Batches larger than this are refused as a whole (a client sends one message at a time).
MAX_BATCH = 32

C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool as ``tools/list`` describes it."""

    name: str
    description: str
    input_schema: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "inputSchema": self.input_schema}


@dataclass(slots=True)
class ToolResult:
    """What a tool answers: a JSON value shown as text, or an error message (``isError``)."""

    data: Any = None
    error: str | None = None

    def to_mcp(self) -> dict[str, Any]:
        if self.error is not None:
            return {"content": [{"type": "text", "text": self.error}], "isError": True}
        return {"content": [{"type": "text", "text": json.dumps(self.data, ensure_ascii=False)}], "isError": False}


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """Status and JSON body (``None``: no body) of the answer to one ``POST``."""

    status: int
    body: Any = None


class _RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


ToolCall = Callable[[str, dict[str, Any], C], Awaitable[ToolResult]]


@dataclass
class Dispatcher(Generic[C]):
    """Answers MCP messages for a set of tools; ``call(name, arguments, context)`` runs one.

    ``context`` is whatever the transport resolved the caller to (the task a token serves); it is
    passed through untouched.
    """

    tools: list[ToolSpec]
    call: ToolCall[C]
    name: str = "ocbridge"
    version: str = "0"
    instructions: str | None = None
    _by_name: dict[str, ToolSpec] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {tool.name: tool for tool in self.tools}

    async def answer(self, body: bytes, context: C) -> HttpAnswer:
        """The HTTP answer to a ``POST`` body."""
        try:
            message = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return HttpAnswer(400, _error(None, PARSE_ERROR, "Parse error: the body is not JSON"))
        except RecursionError:  # the parser's own limit, far above ours
            message = _TOO_DEEP
        if message is _TOO_DEEP or nesting_depth(message, MAX_DEPTH) > MAX_DEPTH:
            return HttpAnswer(400, _error(None, PARSE_ERROR, f"Parse error: nested deeper than {MAX_DEPTH} levels"))
        if isinstance(message, list):
            if not message or len(message) > MAX_BATCH:
                return HttpAnswer(400, _error(None, INVALID_REQUEST, f"a batch holds 1 to {MAX_BATCH} messages"))
            replies = [reply for item in message if (reply := await self._one(item, context)) is not None]
            return HttpAnswer(200, replies) if replies else HttpAnswer(202)
        reply = await self._one(message, context)
        if reply is None:
            return HttpAnswer(202)
        # A lone message that is not valid JSON-RPC is the HTTP request's fault too.
        status = 400 if "error" in reply and reply["error"]["code"] in (INVALID_REQUEST, PARSE_ERROR) else 200
        return HttpAnswer(status, reply)

    async def _one(self, message: Any, context: C) -> dict[str, Any] | None:
        """The reply to one message, or ``None`` for notifications and client responses."""
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return _error(_id_of(message), INVALID_REQUEST, "Invalid Request: not a JSON-RPC 2.0 message")
        method = message.get("method")
        if "id" not in message:
            if isinstance(method, str):
                return None  # a notification (initialized, cancelled...): nothing to answer
            if "result" in message or "error" in message:
                return None  # a response to a request we never send: ignore it
            return _error(None, INVALID_REQUEST, "Invalid Request: no method")
        request_id = message["id"]
        if isinstance(request_id, bool) or not isinstance(request_id, str | int):
            return _error(None, INVALID_REQUEST, "Invalid Request: id must be a string or an integer")
        if not isinstance(method, str):
            if "result" in message or "error" in message:
                return None
            return _error(request_id, INVALID_REQUEST, "Invalid Request: no method")
        params = message.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            return _error(request_id, INVALID_PARAMS, "Invalid params: params must be an object")
        try:
            result = await self._method(method, params, context)
        except _RpcError as exc:
            return _error(request_id, exc.code, exc.message)
        except Exception:
            log.exception("MCP %s failed", method)
            return _error(request_id, INTERNAL_ERROR, "Internal error")
        return {"jsonrpc": "2.0", "id": request_id, "result": result}

    async def _method(self, method: str, params: dict[str, Any], context: C) -> dict[str, Any]:
        if method == "initialize":
            return self._initialize(params)
        if method == "ping":
            return {}
        if method == "tools/list":
            return {"tools": [tool.describe() for tool in self.tools]}
        if method == "tools/call":
            return await self._call(params, context)
        raise _RpcError(METHOD_NOT_FOUND, f"Method not found: {method[:80]}")

    def _initialize(self, params: dict[str, Any]) -> dict[str, Any]:
        asked = params.get("protocolVersion")
        # The client's revision when known, else ours: the client then decides whether to go on.
        version = asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[0]
        result: dict[str, Any] = {
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": self.name, "version": self.version},
        }
        if self.instructions:
            result["instructions"] = self.instructions
        return result

    async def _call(self, params: dict[str, Any], context: C) -> dict[str, Any]:
        name = params.get("name")
        if not isinstance(name, str) or name not in self._by_name:
            shown = name[:80] if isinstance(name, str) else repr(name)[:80]
            raise _RpcError(INVALID_PARAMS, f"Unknown tool: {shown}")
        arguments = params.get("arguments")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            return ToolResult(error="arguments must be a JSON object").to_mcp()
        try:
            result = await self.call(name, arguments, context)
        except Exception:
            # Never crash the sidecar nor leave the agent without an answer.
            log.exception("agent tool %s failed", name)
            result = ToolResult(error=f"{name} failed inside the bridge; see the sidecar's log")
        return result.to_mcp()


def _id_of(message: Any) -> str | int | None:
    if isinstance(message, dict):
        value = message.get("id")
        if isinstance(value, str | int) and not isinstance(value, bool):
            return value
    return None


def _error(request_id: str | int | None, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
