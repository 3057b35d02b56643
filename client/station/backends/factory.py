"""Pick and build the backend that Station's ``coding.backend`` names."""

from __future__ import annotations

from pathlib import Path

from ocbridge.client.connection import NatsOptions
from ocbridge.client.station.config import StationCodingConfig, station_naming

from ... import _sidecar
from .base import LOCAL_ENGINES, CodingBackend
from .nats import BackendError, NatsBackend

__all__ = ["BackendError", "backend_from_config", "nats_backend"]


def nats_backend(config: StationCodingConfig) -> NatsBackend:
    """The ``opencode-nats`` backend: URL, credentials and names from ``coding.nats``."""
    nats = config.nats
    options = NatsOptions(
        url=nats.url or "nats://127.0.0.1:4222",
        creds_file=Path(nats.creds_file) if nats.creds_file else None,
        name="ocbridge-station",
    )
    return NatsBackend(
        options,
        station_naming(config),
        op_timeout=config.bridge.op_timeout_sec,
        # Station's own defaults when unset (its docs: clone 300 s, push 120 s).
        clone_timeout=config.clone_timeout_sec or 300.0,
        push_timeout=config.push_timeout_sec or 120.0,
        result_grace=config.bridge.result_grace_sec,
        default_task_timeout=config.task_timeout_sec(),
        max_attempts=config.max_attempts,
    )


def backend_from_config(config: StationCodingConfig) -> CodingBackend:
    """The backend ``coding.backend`` names, not started yet (``await backend.start()``)."""
    if config.backend == "opencode-nats":
        return nats_backend(config)
    if config.backend in LOCAL_ENGINES:
        return _sidecar.in_process_backend(config)
    raise ValueError(f"unknown backend {config.backend!r}")  # pragma: no cover - validated by the config
