"""The sidecar process: NATS (embedded or external), the engine, the worker, wired together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import stat
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from ocbridge.bridge.agent_tools import AgentToolsServer
from ocbridge.bridge.agent_user import describe, resolve_agent_user
from ocbridge.bridge.jetstream.journal import ensure_result_journal
from ocbridge.bridge.jetstream.natsd import EmbeddedNats
from ocbridge.bridge.jetstream.setup import (
    Buckets,
    ensure_buckets,
    ensure_consumer,
    ensure_dead_letter_stream,
    ensure_task_stream,
)
from ocbridge.bridge.jetstream.worker import Worker
from ocbridge.bridge.observability import tracing
from ocbridge.bridge.observability.heartbeat import Heartbeat, HeartbeatSnapshot
from ocbridge.bridge.observability.http import HealthServer
from ocbridge.bridge.observability.metrics import NO_METRICS, TaskMetrics, build_metrics
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
        self.heartbeat: Heartbeat | None = None
        #: The agent's Station tools over MCP (``agent_tools.enabled``), ``None`` when off.
        self.agent_tools: AgentToolsServer | None = None
        self.runtime: Runtime | None = None
        self._tracing = False  # this sidecar configured tracing (and shuts it down)
        self.metrics: TaskMetrics = NO_METRICS
        #: The health/metrics listener (``observability.http_port``), ``None`` when off.
        self.http: HealthServer | None = None
        #: The umask before ``agent_user`` made the sidecar's files private (restored by stop()).
        self._umask: int | None = None

    @staticmethod
    def _separate_agent(config: BridgeConfig, data_dir: Path) -> BridgeConfig:
        """The configuration with ``git.agent`` set from ``agent_user`` (read by the engine and git),
        ``data_dir`` laid out for it and the workspace root passable for it."""
        assert config.agent_user is not None
        agent = resolve_agent_user(config.agent_user, data_dir)
        agent.prepare()
        root = config.workspace_root.resolve()
        if not root.stat().st_mode & stat.S_IXOTH:
            root.chmod(root.stat().st_mode | stat.S_IXOTH)
            log.info("workspace root %s made passable (o+x) for the agent's user", root)
        log.info("agents run as %s; workspaces belong to it, network git goes through mirrors", describe(agent))
        return config.model_copy(update={"git": config.git.for_agent(agent)})

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
        if config.agent_user:
            # Whatever the sidecar (and the NATS server it starts) writes is its own: the agent's
            # user may pass through data_dir, so a file it can name must not be readable.
            self._umask = os.umask(0o077)
            try:
                config = self.config = self._separate_agent(config, data_dir)
            except BaseException:
                os.umask(self._umask)
                self._umask = None
                raise
        try:
            # Traces from OTEL_* (off unless an exporter is named); flushed by stop().
            self._tracing = self._tracing or tracing.configure(instance_id=self.id, redactor=self.redactor)
            await self._start_http()  # first: /healthz answers, /readyz says what is missing
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
            journal = await ensure_result_journal(js, naming, max_age=settings.task_record_ttl,
                                                  replicas=settings.replicas)
            consumer = await ensure_consumer(js, stream, naming, settings)
            buckets = await ensure_buckets(js, naming, settings, config.observability.heartbeat_ttl)
            await self._start_agent_tools(js, buckets)
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
                metrics=self.metrics,
                agent_tools=self.agent_tools,
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
                metrics=self.metrics,
                journal=journal,
            )
            await self.worker.start()
            await self._start_heartbeat(buckets)
            if config.workspace_max_age > 0:
                self._sweeper = asyncio.create_task(
                    runtime.janitor.sweep_forever(config.workspace_max_age, config.sweep_interval)
                )
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _start_heartbeat(self, buckets: Buckets) -> None:
        """Keep this sidecar's entry in the sidecars bucket (``ocbridge status``)."""
        worker, engine = self.worker, self.engine
        assert worker is not None and engine is not None and buckets.sidecars is not None

        def snapshot() -> HeartbeatSnapshot:
            return HeartbeatSnapshot(slots_used=worker.slots_used, running_tasks=worker.cancels.running,
                                     engine_healthy=engine.healthy(), last_error=worker.last_error)

        obs = self.config.observability
        version = getattr(engine, "version", None)
        self.heartbeat = Heartbeat(
            buckets.sidecars, sidecar_id=self.id, engine=engine.name, concurrency=self.config.concurrency,
            interval=obs.heartbeat_interval, ttl=obs.heartbeat_ttl, snapshot=snapshot,
            engine_version=version if isinstance(version, str) else None,
        )
        await self.heartbeat.start()

    async def _start_agent_tools(self, js: JetStreamContext, buckets: Buckets) -> None:
        """The MCP endpoint serving the agent ``station_kv_get`` & co. over the KV buckets."""
        config = self.config
        if not config.agent_tools.enabled:
            return
        naming = config.naming
        self.agent_tools = AgentToolsServer(
            config.agent_tools, redactor=self.redactor, workspace_root=config.workspace_root, git=config.git,
            state=NatsKeyValue(js, naming.state_bucket, buckets.state),
            sessions=NatsKeyValue(js, naming.sessions_bucket, buckets.sessions),
        )
        await self.agent_tools.start()

    async def _start_http(self) -> None:
        """Metrics (off unless a port or an exporter is configured) and the health/metrics listener."""
        obs = self.config.observability
        self.metrics = build_metrics(self.config, instance=self.id)
        self.metrics.watch(engine=lambda: self.engine, slots=self.config.concurrency,
                           running=lambda: self.worker.slots_used if self.worker is not None else 0)
        if obs.http_port is None:
            return
        self.http = HealthServer(obs.http_host, obs.http_port, metrics=self.metrics, checks={
            "nats": lambda: self._nc is not None and self._nc.is_connected,
            "consumer": lambda: self.worker is not None and self.worker.consumer_bound,
            "engine": lambda: self.engine is not None and self.engine.healthy(),
        })
        await self.http.start()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: no new tasks, running ones get ``grace`` seconds, then everything is reaped."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError), logged_suppress("stopping the sweeper", log):
                await self._sweeper
            self._sweeper = None
        if self.heartbeat is not None:
            await self.heartbeat.stopping()
        if self.worker is not None:
            await self.worker.stop(grace)
            self.worker = None
        if self.agent_tools is not None:  # after the worker: no run needs its tools any more
            with logged_suppress("stopping the agent tools", log):
                await asyncio.wait_for(self.agent_tools.stop(), 10)
            self.agent_tools = None
        if self.heartbeat is not None:  # after the drain: the fleet view shows the tasks finishing
            await self.heartbeat.stop()
            self.heartbeat = None
        if self._nc is not None:
            with logged_suppress("draining the NATS connection", log):
                await asyncio.wait_for(self._nc.drain(), 5)
            with logged_suppress("closing the NATS connection", log, level=logging.DEBUG):
                await asyncio.wait_for(self._nc.close(), 5)
            self._nc = None
        if self._host is not None:
            await self._host.aclose()
            self._host = None
        if self._embedded is not None:
            await self._embedded.stop()
            self._embedded = None
        if self.http is not None:  # last: /readyz says 503 while the rest stops
            with logged_suppress("stopping the health listener", log):
                await asyncio.wait_for(self.http.stop(), 10)
            self.http = None
        metrics, self.metrics = self.metrics, NO_METRICS
        await metrics.aclose()
        if self._umask is not None:
            os.umask(self._umask)
            self._umask = None
        if self._tracing:  # flush the last spans (blocking exporters: off the event loop)
            self._tracing = False
            with logged_suppress("flushing traces", log):
                await asyncio.wait_for(asyncio.to_thread(tracing.shutdown), 15)

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
