"""The offline model server: OpenAI and Anthropic front ends on one loopback port.

Used by tests (``async with OfflineModelServer() as model``) and by ``ocbridge offline-model`` /
``python -m bridge.offline_model`` to run the real OpenCode and Claude Code CLIs with no network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from aiohttp import web

from . import anthropic_api, openai_api

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class OfflineModelServer:
    """A scripted streaming LLM speaking the OpenAI Chat Completions and Anthropic Messages APIs.

    ``requests`` records the JSON body of every request received (``None`` for requests without a
    JSON body), so a test can prove what the model saw; ``calls`` records ``(method, path)`` of every
    HTTP request, including probes such as Claude Code's ``HEAD /``.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any] | None] = []
        self.calls: list[tuple[str, str]] = []
        self.url: str | None = None
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        """The aiohttp application (also handy with ``aiohttp.test_utils``)."""
        app = web.Application(middlewares=[self._record], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
        app.router.add_get("/v1/models", openai_api.list_models)
        app.router.add_post("/v1/messages", anthropic_api.messages)
        app.router.add_post("/v1/messages/count_tokens", anthropic_api.count_tokens)
        app.router.add_route("HEAD", "/", anthropic_api.root)
        app.router.add_get("/", anthropic_api.root, allow_head=False)
        # Claude Code probes this when nonessential traffic is not disabled.
        app.router.add_get("/api/hello", anthropic_api.root)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 picks a free port); return the base URL ``http://host:port``.

        The OpenAI base URL is ``<url>/v1``; the Anthropic one is ``<url>`` itself.
        """
        if self._runner is not None:
            raise RuntimeError("server already started")
        # handler_cancellation: stop a slow stream as soon as the client hangs up.
        runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> OfflineModelServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.calls.append((request.method, request.path))
        body: dict[str, Any] | None = None
        if request.can_read_body:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                body = json.loads(await request.read())  # read() caches: handlers can read again
        if request.method == "POST":
            self.requests.append(body)
        log.debug("offline model: %s %s", request.method, request.path)
        return await handler(request)


async def _serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = OfflineModelServer()
    url = await server.start(host, port)
    print(f"offline model listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``ocbridge offline-model [--host H] [--port P]``; serves until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="ocbridge offline-model",
        description="Serve a scripted LLM (OpenAI and Anthropic APIs) for offline agent runs.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args.host, args.port))
    except OSError as exc:
        print(f"offline model: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0
