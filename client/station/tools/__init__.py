"""Station's coding tools (``coding_open``, ``code``, ``coding_branch``, ``coding_commit``,
``coding_push``, ``coding_close``): async functions, pydantic models and JSON Schemas."""

from __future__ import annotations

from .coding import CodingToolError, CodingTools, ToolDefaults, build_prompt
from .factory import defaults_from_config, tools_from_config
from .models import TOOL_MODELS, FileChanged, Trace, TraceToolCall
from .schemas import TOOL_DESCRIPTIONS, TOOL_NAMES, TOOL_SCHEMAS, anthropic_tools, openai_tools
from .sessions import SessionLookupError, find_session

__all__ = [
    "TOOL_DESCRIPTIONS",
    "TOOL_MODELS",
    "TOOL_NAMES",
    "TOOL_SCHEMAS",
    "CodingToolError",
    "CodingTools",
    "FileChanged",
    "SessionLookupError",
    "ToolDefaults",
    "Trace",
    "TraceToolCall",
    "anthropic_tools",
    "build_prompt",
    "defaults_from_config",
    "find_session",
    "openai_tools",
    "tools_from_config",
]
