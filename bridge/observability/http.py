"""The sidecar's health and metrics listener: ``/healthz``, ``/readyz`` and ``/metrics``.

- ``/healthz``: 200 while the process serves HTTP at all (liveness).
- ``/readyz``: 200 when every readiness check passes (NATS connected, the task consumer bound,
  the engine healthy), else 503; both with a JSON body naming each check, the 503 one also what
  is ``missing``. Checks are read on every request, so the answer flips as soon as a part goes
  away and again when it is back.
- ``/metrics``: the sidecar's metrics in Prometheus text format (:mod:`.metrics`).

It listens on ``observability.http_host`` (loopback unless configured otherwise) and
``observability.http_port`` (0: a free port, see :attr:`HealthServer.port`), and is off when no
port is configured.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from aiohttp import web

from .metrics import TaskMetrics

__all__ = ["HealthServer", "Readiness"]

log = logging.getLogger(__name__)

#: A readiness check: its name (``nats``, ``consumer``, ``engine``) and whether it passes now.
Readiness = Mapping[str, Callable[[], bool]]


class HealthServer:
    """An aiohttp listener for the health, readiness and metrics endpoints.

    ``async with HealthServer(host, port, checks=..., metrics=...) as server: server.url``.
    """

    def __init__(self, host: str, port: int, *, checks: Readiness, metrics: TaskMetrics) -> None:
        self.host = host
        self._port = port
        self._checks = dict(checks)
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        #: The address actually bound (``host``, ``port``), once started.
        self.address: tuple[str, int] | None = None

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the free one picked for port 0)."""
        if self.address is None:
            raise RuntimeError("the health listener is not started")
        return self.address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve; raises ``OSError`` when the address cannot be bound."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_text)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        self.address = (str(bound[0]), int(bound[1]))
        log.info("health and metrics at %s (/healthz, /readyz, /metrics)", self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def readiness(self) -> dict[str, bool]:
        """Every check's current answer; a check that raises counts as failing."""
        answers = {}
        for name, check in self._checks.items():
            try:
                answers[name] = bool(check())
            except Exception as exc:
                log.debug("readiness check %s failed: %r", name, exc)
                answers[name] = False
        return answers

    # ------------------------------------------------------------------------------ handlers

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = self.readiness()
        missing = [name for name, ok in checks.items() if not ok]
        if missing:
            return web.json_response({"ready": False, "missing": missing, "checks": checks}, status=503)
        return web.json_response({"ready": True, "checks": checks})

    async def _metrics_text(self, request: web.Request) -> web.Response:
        # Collecting runs the gauges' callbacks (psutil over OpenCode's process tree): off the loop.
        exported = await asyncio.to_thread(self._metrics.prometheus_text)
        if exported is None:
            return web.Response(status=404, text="metrics are off\n")
        body, content_type = exported
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()
