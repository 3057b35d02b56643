"""Map abstract actions (write, edit, bash, read) onto the tools a client actually offers.

OpenCode calls them ``write {filePath, content}``, ``edit {filePath, oldString, newString}``,
``bash {command, ...}``, ``read {filePath}``; Claude Code ``Write {file_path, content}``, ``Edit
{file_path, old_string, new_string}``, ``Bash {command, description}``, ``Read {file_path}``. The
argument names are taken from each tool's JSON schema, so either client (or a future rename between
camelCase and snake_case) works without a per-client table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .conversation import Conversation, ToolSpec

# Abstract argument -> candidate wire names, preferred first.
_ARG_NAMES: dict[str, tuple[str, ...]] = {
    "path": ("filePath", "file_path", "path"),
    "content": ("content",),
    "old": ("oldString", "old_string"),
    "new": ("newString", "new_string"),
    "command": ("command",),
    "description": ("description",),
}
_OPTIONAL = frozenset({"description"})


@dataclass(frozen=True, slots=True)
class Action:
    """What the script wants done: ``kind`` is write, edit, bash or read; ``args`` use abstract names.

    With ``by_suffix``, ``kind`` is the end of an offered tool's name (MCP tools get a prefix that
    depends on the client) and ``args`` are its exact arguments.
    """

    kind: str
    args: dict[str, Any]
    by_suffix: bool = False


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A concrete call of an offered tool."""

    id: str
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def bind(action: Action, conv: Conversation, call_id: str) -> ToolCall | None:
    """The call of the offered tool named like ``action.kind``; None if the client lacks that tool."""
    if action.by_suffix:
        suffix = action.kind.lower()
        named = next((t for t in conv.tools if t.name.lower().endswith(suffix)), None)
        return ToolCall(call_id, named.name, dict(action.args)) if named is not None else None
    spec = conv.tool(action.kind)
    if spec is None:
        return None
    args = {}
    for key, value in action.args.items():
        name = _arg_name(key, spec)
        if name is not None:
            args[name] = value
    return ToolCall(call_id, spec.name, args)


def _arg_name(key: str, spec: ToolSpec) -> str | None:
    candidates = _ARG_NAMES[key]
    for name in candidates:
        if name in spec.properties:
            return name
    if spec.properties and key in _OPTIONAL:
        return None  # the schema is known and has no such optional argument
    # Unknown schema: follow the client's convention (Claude Code capitalises tool names).
    snake = spec.name[:1].isupper()
    return next((n for n in candidates if ("_" in n) == snake or n.islower()), candidates[0])
