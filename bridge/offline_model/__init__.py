"""An offline scripted LLM server so the real OpenCode and Claude Code CLIs run with no network.

See :mod:`.script` for the prompt language and :class:`OfflineModelServer` for the server.
"""

from .configs import claude_env, opencode_provider_config
from .server import OfflineModelServer, main

__all__ = ["OfflineModelServer", "claude_env", "main", "opencode_provider_config"]
