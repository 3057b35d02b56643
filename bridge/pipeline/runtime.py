"""Assemble the task pipeline and the operations handler from stores and an engine.

The sidecar passes NATS stores and a NATS publisher; the in-process runner passes folders and a
callback. Everything else is the same code.

Session leases (one task or operation at a time per session) live in ``leases``: for the sidecar
a dedicated NATS KV bucket shared by every sidecar, history 1, ``max_age`` = ``lease_ttl``
(:data:`~ocbridge.bridge.storage.leases.LEASE_BUCKET_SETTINGS`), wrapped in ``NatsKeyValue``; for
the in-process runner a folder. Without one, leases only exclude tasks within this process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ocbridge.bridge.config import BridgeConfig
from ocbridge.bridge.engines.base import Engine
from ocbridge.bridge.observability.metrics import NO_METRICS, TaskMetrics
from ocbridge.bridge.pipeline.task import TaskPipeline
from ocbridge.bridge.redact import Redactor
from ocbridge.bridge.storage.leases import DEFAULT_TTL, SessionLeases
from ocbridge.bridge.storage.sessions import SessionStore
from ocbridge.bridge.storage.stores import ArtifactStore, KeyValueStore
from ocbridge.bridge.workspace.baselines import BaselineStore
from ocbridge.bridge.workspace.git.mirror import forget_mirrors
from ocbridge.bridge.workspace.janitor import WorkspaceJanitor
from ocbridge.bridge.workspace.prepare import WorkspaceFlow

from .emitter import Publish
from .ops import OpsHandler

if TYPE_CHECKING:
    from ocbridge.bridge.agent_tools import AgentToolsServer


@dataclass
class Runtime:
    pipeline: TaskPipeline
    ops: OpsHandler
    sessions: SessionStore
    janitor: WorkspaceJanitor


def build_runtime(
    config: BridgeConfig,
    engine: Engine,
    *,
    publish: Publish,
    sessions: KeyValueStore,
    state: KeyValueStore,
    artifacts: ArtifactStore,
    redactor: Redactor,
    leases: KeyValueStore | None = None,
    lease_ttl: float = DEFAULT_TTL,
    holder: str | None = None,
    metrics: TaskMetrics = NO_METRICS,
    agent_tools: AgentToolsServer | None = None,
) -> Runtime:
    """``holder`` names this process in lease values (the sidecar's id); ``agent_tools`` serves the
    agent its Station tools."""
    root = config.workspace_root.resolve()
    session_store = SessionStore(sessions, redactor, SessionLeases(leases, ttl=lease_ttl, holder=holder))
    baselines = BaselineStore(config.data_dir.resolve() / "baselines", max_age=config.jetstream.task_record_ttl)
    flow = WorkspaceFlow(root=root, git=config.git, state=state, artifacts=artifacts, redactor=redactor,
                         baselines=baselines)
    agent = config.git.agent
    janitor = WorkspaceJanitor(state, root, config.cleanup_policy,
                               on_delete=functools.partial(forget_mirrors, agent) if agent else None)
    pipeline = TaskPipeline(
        publish=publish, engine=engine, sessions=session_store, flow=flow, janitor=janitor,
        config=config, redactor=redactor, metrics=metrics, agent_tools=agent_tools,
    )
    ops = OpsHandler(engine=engine, sessions=session_store, flow=flow, janitor=janitor, redactor=redactor)
    return Runtime(pipeline=pipeline, ops=ops, sessions=session_store, janitor=janitor)
