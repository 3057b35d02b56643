"""Agent engines that run one CLI process per prompt: OpenCode (``opencode run``) and Claude Code (``claude -p``)."""

from .claudecode import ClaudeCodeEngine, ClaudeCodeSettings
from .common import CLISettings
from .opencode_cli import OpenCodeCLIEngine, OpenCodeCLISettings

__all__ = [
    "CLISettings",
    "ClaudeCodeEngine",
    "ClaudeCodeSettings",
    "OpenCodeCLIEngine",
    "OpenCodeCLISettings",
]
