"""In-process backends: ``opencode`` (HTTP to ``opencode serve``), ``opencode-cli`` and ``claudecode``.

They run the sidecar's own task pipeline and workspace operations in this process through
:class:`~ocbridge.bridge.inprocess.runner.LocalRunner`, so a task's result and an operation's reply
have exactly the shape the sidecar would publish. The client builds them through its one seam into
the sidecar (``ocbridge.client._sidecar``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ocbridge.client.mappings import deep_merge
from ocbridge.client.protocol import GitOpRequest, GitOpResult, SessionState, Task, TaskResult
from ocbridge.client.station.backends.base import LOCAL_ENGINES, CodingBackend, EventCallback
from ocbridge.client.station.backends.nats import BackendError
from ocbridge.client.station.config import StationCodingConfig, StationConfigError

from ..config import ConfigError, load_config
from ..logs import logged_suppress
from .runner import LocalRunner

log = logging.getLogger(__name__)


def _prune(data: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``None`` values and empty sections, so that the sidecar's defaults apply to them."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            value = _prune(value)
            if not value:
                continue
        if value is not None:
            out[key] = value
    return out


def local_bridge_config(station: StationCodingConfig, backend: str) -> dict[str, Any]:
    """Station's ``coding:`` settings as overrides for ``bridge.config.load_config`` (a plain dict, so
    a renamed sidecar key breaks only here). ``coding.bridge.sidecar`` is merged last and wins."""
    if backend not in LOCAL_ENGINES:
        raise StationConfigError(f"coding.backend: {backend!r} does not run in-process")
    cc = station.claudecode
    token = station.git.token.get_secret_value() if station.git.token is not None else None
    data: dict[str, Any] = {
        "engine": backend,
        "workspace_root": station.workspace_base_path,
        "data_dir": station.bridge.data_dir,
        "offline_model": station.bridge.offline_model or None,
        "default_task_timeout": station.task_timeout_sec(),
        "cleanup_policy": station.cleanup_policy,
        "jetstream": {"max_attempts": station.max_attempts},
        "opencode": {"url": station.opencode.url, "model": station.opencode.model},
        "opencode_cli": {"binary": station.cli.binary_path},
        "claudecode": {
            "binary": cc.binary_path,
            "model": cc.model,
            "max_turns": cc.max_turns,
            "allowed_tools": cc.allowed_tools or None,
            "disallowed_tools": cc.disallowed_tools or None,
        },
        "git": {
            "token_env": station.git.token_env,
            "token": token,
            "user_name": station.git.user_name,
            "user_email": station.git.user_email,
            "clone_timeout": station.clone_timeout_sec,
            "push_timeout": station.push_timeout_sec,
        },
    }
    data = _prune(data)
    data = deep_merge(data, {"git": station.bridge.git} if station.bridge.git else {})
    return deep_merge(data, station.bridge.sidecar)


class LocalBackend(CodingBackend):
    """Runs the pipeline in this process with one of the local engines."""

    def __init__(self, engine: str, overrides: Mapping[str, Any] | None = None) -> None:
        if engine not in LOCAL_ENGINES:
            raise ValueError(f"unknown local engine {engine!r}; choose from {LOCAL_ENGINES}")
        self.name = engine
        self.overrides = dict(overrides or {})
        self._runner: LocalRunner | None = None

    @classmethod
    def from_station(cls, station: StationCodingConfig) -> LocalBackend:
        return cls(station.backend, local_bridge_config(station, station.backend))

    @property
    def runner(self) -> LocalRunner:
        if self._runner is None:
            raise BackendError(f"the {self.name} backend is not started")
        return self._runner

    async def start(self) -> None:
        if self._runner is not None:
            return
        try:
            config = load_config(overrides={**self.overrides, "engine": self.name}, environ={})
        except ConfigError as exc:
            raise StationConfigError(f"coding (backend {self.name}): {exc}") from None
        runner = LocalRunner(config)
        try:
            await runner.start()
        except BaseException:
            with logged_suppress(f"stopping the {self.name} backend after a failed start", log):
                await runner.aclose()
            raise
        self._runner = runner

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.aclose()

    async def run(self, task: Task, on_event: EventCallback | None = None) -> TaskResult:
        return await self.runner.run(task, on_event)

    async def op(self, request: GitOpRequest) -> GitOpResult:
        return await self.runner.op(request)

    async def sessions(self) -> list[SessionState]:
        return await self.runner.sessions()
