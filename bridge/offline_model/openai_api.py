"""OpenAI Chat Completions front end (what OpenCode's ``@ai-sdk/openai-compatible`` provider calls).

``POST /v1/chat/completions`` streams ``chat.completion.chunk`` frames shaped like OpenAI's: a role
delta, ``reasoning_content`` deltas (the AI SDK maps them to reasoning parts), content deltas,
``tool_calls`` deltas (id and name first, then argument fragments), a finish chunk, a usage chunk when
``stream_options.include_usage`` is set, and ``data: [DONE]``. ``GET /v1/models`` lists the model.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web

from .conversation import Conversation, Message, ToolSpec, flatten
from .script import Reply, respond, usage
from .streaming import ClientGone, open_stream, pieces, send

MODEL_ID = "scripted"


def to_conversation(body: dict[str, Any]) -> Conversation:
    """Reduce a Chat Completions request to a :class:`Conversation`."""
    conv = Conversation()
    systems = []
    for msg in body.get("messages") or []:
        role, content = msg.get("role"), msg.get("content")
        if role in ("system", "developer"):
            systems.append(flatten(content))
        elif role == "user":
            conv.messages.append(Message("user", texts=[flatten(content)]))
        elif role == "assistant":
            calls = len(msg.get("tool_calls") or [])
            conv.messages.append(Message("assistant", texts=[flatten(content)], tool_calls=calls))
        elif role == "tool":
            last = conv.messages[-1] if conv.messages else None
            if last is not None and last.role == "user" and last.tool_results and not last.texts:
                last.tool_results.append(flatten(content))
            else:
                conv.messages.append(Message("user", tool_results=[flatten(content)]))
    conv.system = "\n".join(systems)
    for tool in body.get("tools") or []:
        fn = tool.get("function") or {}
        props = (fn.get("parameters") or {}).get("properties") or {}
        conv.tools.append(ToolSpec(fn.get("name", ""), frozenset(props)))
    return conv


def error_body(status: int, message: str) -> dict[str, Any]:
    """An OpenAI-style error document."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}.get(status, kind)
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``, streaming or not."""
    try:
        body = await request.json()
    except ValueError:
        return web.json_response(error_body(400, "request body is not JSON"), status=400)
    reply = respond(to_conversation(body), nonce=uuid.uuid4().hex)
    if reply.error:
        status, message = reply.error
        return web.json_response(error_body(status, message), status=status)
    tokens = usage(len(json.dumps(body.get("messages") or [])), reply)
    model = body.get("model") or MODEL_ID
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await _stream(request, reply, model, tokens if include_usage else None)
    await asyncio.sleep(len(reply.slow) * reply.slow_delay)
    return web.json_response(_completion(reply, model, tokens))


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``."""
    model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "offline"}
    return web.json_response({"object": "list", "data": [model]})


def _usage(tokens: tuple[int, int], reply: Reply) -> dict[str, Any]:
    prompt, completion = tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "completion_tokens_details": {"reasoning_tokens": -(-len(reply.reasoning) // 4)},
    }


def _completion(reply: Reply, model: str, tokens: tuple[int, int]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.full_text or None}
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
            for c in reply.tool_calls
        ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish}],
        "usage": _usage(tokens, reply),
    }


async def _stream(request: web.Request, reply: Reply, model: str, tokens: tuple[int, int] | None) -> web.StreamResponse:
    resp = await open_stream(request)
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }

    async def chunk(delta: dict[str, Any], finish: str | None = None) -> None:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        await send(resp, {**base, "choices": [choice]})

    try:
        await chunk({"role": "assistant", "content": ""})
        for part in pieces(reply.reasoning):
            await chunk({"reasoning_content": part})
        for part in reply.slow:
            await chunk({"content": part})
            await asyncio.sleep(reply.slow_delay)
        for part in pieces(reply.text):
            await chunk({"content": part})
        for i, call in enumerate(reply.tool_calls):
            function = {"name": call.name, "arguments": ""}
            head = {"index": i, "id": call.id, "type": "function", "function": function}
            await chunk({"tool_calls": [head]})
            for part in pieces(call.arguments_json):
                await chunk({"tool_calls": [{"index": i, "function": {"arguments": part}}]})
        await chunk({}, reply.finish)
        if tokens is not None:
            await send(resp, {**base, "choices": [], "usage": _usage(tokens, reply)})
        await send(resp, "[DONE]")
        await resp.write_eof()
    except ClientGone:
        pass  # aborted by the client: nothing left to do
    return resp
