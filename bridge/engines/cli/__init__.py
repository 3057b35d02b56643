"""Agent engines that run one CLI process per prompt: OpenCode (``opencode run``) and Claude Code (``claude -p``)."""

from .claudecode import ClaudeCodeEngine, ClaudeCodeSettings
from .common import CLIRunOutcome, CLISettings
from .opencode_cli import OpenCodeCLIEngine, OpenCodeCLISettings

__all__ = [
    "CLIRunOutcome",
    "CLISettings",
    "ClaudeCodeEngine",
    "ClaudeCodeSettings",
    "OpenCodeCLIEngine",
    "OpenCodeCLISettings",
]
