"""Server-sent events over aiohttp, tolerant of clients that hang up mid-stream (aborts, timeouts)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from aiohttp import web


class ClientGone(Exception):
    """The client closed the connection; stop streaming quietly."""


async def open_stream(request: web.Request, headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Start a ``text/event-stream`` response."""
    resp = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **(headers or {})},
    )
    await resp.prepare(request)
    return resp


async def send(resp: web.StreamResponse, data: Any, event: str | None = None) -> None:
    """Write one SSE frame; ``data`` is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    frame = (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
    try:
        await resp.write(frame.encode())
    except (ConnectionResetError, ConnectionError) as exc:
        raise ClientGone from exc


def pieces(text: str, parts: int = 3) -> Iterator[str]:
    """Split ``text`` into about ``parts`` non-empty deltas, as a real model streams tokens."""
    if not text:
        return
    size = max(1, -(-len(text) // parts))
    for i in range(0, len(text), size):
        yield text[i : i + size]
