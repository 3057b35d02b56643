"""Anthropic Messages API front end (what Claude Code calls with ``ANTHROPIC_BASE_URL``).

``POST /v1/messages`` (Claude Code adds ``?beta=true``) streams the documented event sequence:
``message_start``, ``ping``, one ``content_block_start``/``_delta``/``_stop`` group per block
(``thinking`` with ``thinking_delta`` + ``signature_delta``, ``text`` with ``text_delta``, ``tool_use``
with ``input_json_delta`` fragments), ``message_delta`` (stop reason, usage) and ``message_stop``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import uuid
from typing import Any

from aiohttp import web

from .conversation import Conversation, Message, ToolSpec, flatten
from .script import Reply, respond, usage
from .streaming import ClientGone, open_stream, pieces, send

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
# Block fields as content_block_start shows them; deltas fill them in.
_EMPTY: dict[str, dict[str, Any]] = {
    "thinking": {"thinking": "", "signature": ""},
    "text": {"text": ""},
    "tool_use": {"input": {}},
}


def to_conversation(body: dict[str, Any]) -> Conversation:
    """Reduce a Messages API request to a :class:`Conversation`."""
    conv = Conversation()
    systems = [flatten(body.get("system") or "")]
    for msg in body.get("messages") or []:
        role, content = msg.get("role"), msg.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        if role == "system":  # Claude Code sends its environment block as a system-role message
            systems.append(flatten(blocks))
            continue
        out = Message("assistant" if role == "assistant" else "user")
        for block in blocks:
            kind = block.get("type")
            if kind == "text":
                out.texts.append(block.get("text", ""))
            elif kind == "tool_result":
                out.tool_results.append(flatten(block.get("content", "")))
            elif kind in ("tool_use", "server_tool_use"):
                out.tool_calls += 1
        conv.messages.append(out)
    conv.system = "\n".join(s for s in systems if s)
    for tool in body.get("tools") or []:
        props = (tool.get("input_schema") or {}).get("properties") or {}
        conv.tools.append(ToolSpec(tool.get("name", ""), frozenset(props)))
    return conv


def error_body(status: int, message: str) -> dict[str, Any]:
    """An Anthropic-style error document."""
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": _request_id()}


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``, streaming or not."""
    try:
        body = await request.json()
    except ValueError:
        return web.json_response(error_body(400, "request body is not JSON"), status=400)
    reply = respond(to_conversation(body), nonce=uuid.uuid4().hex)
    if reply.error:
        status, message = reply.error
        # x-should-retry mirrors the real API so the client's retry policy sees what it expects.
        retry = "true" if status in (408, 409, 429) or status >= 500 else "false"
        headers = {"request-id": _request_id(), "x-should-retry": retry}
        return web.json_response(error_body(status, message), status=status, headers=headers)
    tokens = usage(_prompt_chars(body), reply)
    model = body.get("model") or "scripted"
    if body.get("stream"):
        return await _stream(request, reply, model, tokens)
    await asyncio.sleep(len(reply.slow) * reply.slow_delay)
    message = _message(reply, model, tokens)
    message["content"] = _blocks(reply)
    message["stop_reason"] = _stop_reason(reply)
    return web.json_response(message, headers={"request-id": _request_id()})


async def count_tokens(request: web.Request) -> web.Response:
    """``POST /v1/messages/count_tokens``."""
    try:
        body = await request.json()
    except ValueError:
        return web.json_response(error_body(400, "request body is not JSON"), status=400)
    chars = _prompt_chars(body) + len(json.dumps(body.get("tools") or []))
    return web.json_response({"input_tokens": math.ceil(chars / 4)})


async def root(request: web.Request) -> web.Response:
    """``HEAD /``, ``GET /`` and ``/api/hello``: connectivity probes Claude Code may send."""
    return web.Response(text="offline scripted model")


def _prompt_chars(body: dict[str, Any]) -> int:
    return len(json.dumps(body.get("messages") or [])) + len(json.dumps(body.get("system") or ""))


def _request_id() -> str:
    return f"req_offline_{uuid.uuid4().hex[:24]}"


def _signature(thinking: str) -> str:
    """A stand-in for the opaque signature that proves a thinking block came from the model."""
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


def _stop_reason(reply: Reply) -> str:
    return "tool_use" if reply.tool_calls else "end_turn"


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }


def _message(reply: Reply, model: str, tokens: tuple[int, int]) -> dict[str, Any]:
    return {
        "id": f"msg_offline_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _usage(*tokens),
    }


def _blocks(reply: Reply) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if reply.reasoning:
        signature = _signature(reply.reasoning)
        blocks.append({"type": "thinking", "thinking": reply.reasoning, "signature": signature})
    if reply.full_text:
        blocks.append({"type": "text", "text": reply.full_text})
    for call in reply.tool_calls:
        blocks.append({"type": "tool_use", "id": f"toolu_{call.id}", "name": call.name, "input": call.arguments})
    return blocks


def _deltas(block: dict[str, Any], reply: Reply) -> list[tuple[dict[str, Any], float]]:
    """How a finished block is streamed: ``(delta, pause after it)`` pairs."""
    if block["type"] == "thinking":
        deltas = [({"type": "thinking_delta", "thinking": p}, 0.0) for p in pieces(block["thinking"])]
        return [*deltas, ({"type": "signature_delta", "signature": block["signature"]}, 0.0)]
    if block["type"] == "text":
        slow = [({"type": "text_delta", "text": p}, reply.slow_delay) for p in reply.slow]
        return slow + [({"type": "text_delta", "text": p}, 0.0) for p in pieces(reply.text)]
    arguments = json.dumps(block["input"], ensure_ascii=False)
    return [({"type": "input_json_delta", "partial_json": p}, 0.0) for p in pieces(arguments)]


def _empty(block: dict[str, Any]) -> dict[str, Any]:
    """A block as ``content_block_start`` announces it, before any delta."""
    return {**block, **_EMPTY[block["type"]]}


async def _stream(request: web.Request, reply: Reply, model: str, tokens: tuple[int, int]) -> web.StreamResponse:
    resp = await open_stream(request, {"request-id": _request_id()})

    async def event(name: str, data: dict[str, Any]) -> None:
        await send(resp, {"type": name, **data}, event=name)

    try:
        start = _message(reply, model, (tokens[0], 1))  # the real API reports 1 output token here
        await event("message_start", {"message": start})
        await event("ping", {})
        for index, block in enumerate(_blocks(reply)):
            await event("content_block_start", {"index": index, "content_block": _empty(block)})
            for delta, pause in _deltas(block, reply):
                await event("content_block_delta", {"index": index, "delta": delta})
                if pause:
                    await asyncio.sleep(pause)
            await event("content_block_stop", {"index": index})
        stop = {"stop_reason": _stop_reason(reply), "stop_sequence": None}
        await event("message_delta", {"delta": stop, "usage": _usage(*tokens)})
        await event("message_stop", {})
        await resp.write_eof()
    except ClientGone:
        pass  # aborted by the client
    return resp
