"""The sidecar process: NATS (embedded or external), the engine, the worker, wired together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket

from nats.aio.client import Client as NATS

from ocbridge.bridge.jetstream.natsd import EmbeddedNats
from ocbridge.bridge.jetstream.setup import (
    ensure_buckets,
    ensure_consumer,
    ensure_dead_letter_stream,
    ensure_task_stream,
)
from ocbridge.bridge.jetstream.worker import Worker
from ocbridge.bridge.pipeline.runtime import Runtime, build_runtime
from ocbridge.bridge.storage.stores import NatsArtifacts, NatsKeyValue
from ocbridge.client.connection import connect, redact_nats_url

from .config import BridgeConfig
from .engines.base import Engine
from .engines.factory import EngineHost
from .logs import logged_suppress
from .redact import Redactor, default_redactor

log = logging.getLogger(__name__)


class Sidecar:
    """Runs tasks from NATS on an engine until stopped. ``async with Sidecar(cfg) as s: ...``."""

    def __init__(
        self, config: BridgeConfig, *, engine: Engine | None = None, redactor: Redactor | None = None
    ) -> None:
        self.config = config
        self.redactor = redactor or default_redactor
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.engine = engine
        self._host: EngineHost | None = None
        self.nats_url: str | None = config.nats.url
        self._embedded: EmbeddedNats | None = None
        self._nc: NATS | None = None
        self.worker: Worker | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.runtime: Runtime | None = None

    async def start(self) -> None:
        config = self.config
        for secret in (config.nats.password, config.nats.token, config.opencode.password, config.git.token):
            if secret is not None:
                self.redactor.add(secret.get_secret_value())
        for name, value in config.claudecode.env.items():
            if any(word in name.upper() for word in ("KEY", "TOKEN", "SECRET", "PASSWORD")):
                self.redactor.add(value)
        data_dir = config.data_dir.resolve()
        config.workspace_root.mkdir(parents=True, exist_ok=True)
        try:
            if not self.nats_url:
                self._embedded = EmbeddedNats(
                    data_dir / "nats", host=config.embedded_nats.host, port=config.embedded_nats.port
                )
                self.nats_url = await self._embedded.start()
                log.info("no NATS URL configured: embedded NATS at %s", self.nats_url)
            self._host = EngineHost(config, data_dir=data_dir, engine=self.engine)
            self.engine = await self._host.start()

            options = config.nats.model_copy(update={"url": self.nats_url, "name": f"ocbridge-{self.id}"})
            self._nc = await connect(options)
            log.info("connected to NATS at %s", redact_nats_url(self.nats_url))
            js = self._nc.jetstream()
            naming, settings = config.naming, config.jetstream
            stream = await ensure_task_stream(js, naming, settings)
            await ensure_dead_letter_stream(js, naming)
            consumer = await ensure_consumer(js, stream, naming, settings)
            buckets = await ensure_buckets(js, naming, settings)
            runtime = self.runtime = build_runtime(
                config,
                self.engine,
                publish=self._nc.publish,
                sessions=NatsKeyValue(js, naming.sessions_bucket, buckets.sessions),
                state=NatsKeyValue(js, naming.state_bucket, buckets.state),
                artifacts=NatsArtifacts(buckets.files),
                redactor=self.redactor,
                leases=NatsKeyValue(js, naming.leases_bucket, buckets.leases),
                lease_ttl=settings.lease_ttl,
                holder=self.id,
            )
            self.worker = Worker(
                nc=self._nc,
                js=js,
                stream=stream,
                buckets=buckets,
                consumer=consumer,
                runtime=runtime,
                config=config,
                redactor=self.redactor,
                sidecar_id=self.id,
                healthy=self.engine.healthy,
                rebind=lambda: ensure_consumer(js, stream, naming, settings),
            )
            await self.worker.start()
            if config.workspace_max_age > 0:
                self._sweeper = asyncio.create_task(
                    runtime.janitor.sweep_forever(config.workspace_max_age, config.sweep_interval)
                )
        except BaseException:
            await self.stop(grace=0)
            raise

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: no new tasks, running ones get ``grace`` seconds, then everything is reaped."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError), logged_suppress("stopping the sweeper", log):
                await self._sweeper
            self._sweeper = None
        if self.worker is not None:
            await self.worker.stop(grace)
            self.worker = None
        if self._nc is not None:
            with logged_suppress("draining the NATS connection", log):
                await asyncio.wait_for(self._nc.drain(), 5)
            with logged_suppress("closing the NATS connection", log, level=logging.DEBUG):
                await self._nc.close()
            self._nc = None
        if self._host is not None:
            await self._host.aclose()
            self._host = None
        if self._embedded is not None:
            await self._embedded.stop()
            self._embedded = None

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            # A signal must stop the sidecar in every state, including while start() still waits
            # for its first NATS connection.
            starting = asyncio.create_task(self.start())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                log.info("signal received while starting: stopping")
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                return
            stopped.cancel()
            starting.result()  # a failed start raises here
            log.info("sidecar %s ready; workspaces under %s", self.id, self.config.workspace_root)
            await stop.wait()
            log.info("signal received: stopping (grace %.0fs)", self.config.shutdown_grace)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()

    async def __aenter__(self) -> Sidecar:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()
