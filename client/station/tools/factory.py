"""The tools as Station's ``coding:`` configuration sets them up."""

from __future__ import annotations

from collections.abc import Mapping

from ocbridge.client.station.config import StationCodingConfig

from ..backends.factory import backend_from_config
from .coding import CodingTools, ToolDefaults


def defaults_from_config(config: StationCodingConfig, environ: Mapping[str, str] | None = None) -> ToolDefaults:
    """Per-call settings: task timeout, cleanup policy, model and (for NATS) the git token
    (``git.token``, or the variable ``git.token_env`` names in ``environ``, default ``os.environ``)."""
    model = config.opencode.model if config.backend == "opencode-nats" else None
    return ToolDefaults(
        task_timeout=config.task_timeout_sec(),
        cleanup_policy=config.cleanup_policy,
        # Only a provider/model pair can travel in a task; a bare name is left to the sidecar.
        model=model if model and "/" in model else None,
        # In-process backends read the token from their git settings; a sidecar gets it per request
        # (as Station sends it), so that Station's credentials work for clones and pushes.
        git_token=config.git_token(environ) if config.backend == "opencode-nats" else None,
        author_name=config.git.user_name,
        author_email=config.git.user_email,
    )


def tools_from_config(config: StationCodingConfig, environ: Mapping[str, str] | None = None) -> CodingTools:
    """The tools over the configured backend (started on first use; ``await tools.aclose()``)."""
    return CodingTools(backend_from_config(config), defaults=defaults_from_config(config, environ))
