"""The pipeline without NATS: :class:`LocalRunner` runs tasks and operations in this process, and
:class:`LocalBackend` offers it to Station's tools as the ``opencode``, ``opencode-cli`` and
``claudecode`` backends."""

from .backends import LocalBackend, local_bridge_config
from .runner import LocalRunner

__all__ = ["LocalBackend", "LocalRunner", "local_bridge_config"]
