"""JSON Schemas of the six tools' inputs, written for an LLM: short, every argument described,
required ones listed, nothing else accepted. Also in the shapes OpenAI and Anthropic expect.

The schemas are generated from the input models of :mod:`.models` (argument descriptions are their
``Field(description=...)``), then simplified for LLM and MCP clients: no ``title`` keys, an optional
argument is given as its plain type instead of ``anyOf: [type, null]`` with ``default: null``, and
``required`` is always listed. Nested models (``$defs``) are refused: some clients cannot resolve them.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from .models import TOOL_MODELS

TOOL_DESCRIPTIONS: dict[str, str] = {
    "coding_open": (
        "Open a coding session. Give repo_url to clone a repository into a fresh workspace, "
        "workspace_path to work in an existing folder, or existing_session_id to continue an earlier "
        "session (its ses_... id or part of its title). Returns the session_id the other coding tools need."
    ),
    "code": (
        "Delegate a coding task to the AI coding assistant in an open session: it reads, writes and "
        "edits files and runs commands in the workspace. Use for code changes, bug fixes and features."
    ),
    "coding_branch": "Create a git branch and switch to it, or switch to an existing branch.",
    "coding_commit": "Commit the workspace's changes (all of them by default) and return the commit hash.",
    "coding_push": "Push commits to the remote repository.",
    "coding_close": (
        "Close a coding session: reports the files changed and cleans up a managed workspace "
        "according to the cleanup policy."
    ),
}


def _argument(schema: dict[str, Any]) -> dict[str, Any]:
    """One property: ``title`` dropped, ``T | None`` shown as ``T`` (an LLM should omit, not send null)."""
    out = {k: v for k, v in schema.items() if k not in ("title", "anyOf")}
    if "anyOf" in schema:
        types = [v for v in schema["anyOf"] if v != {"type": "null"}]
        if len(types) != 1:
            raise TypeError(f"tool argument schema too complex for LLM clients: {schema}")
        out = {**types[0], **out}
        if out.get("default", ...) is None:
            del out["default"]
    return out


def tool_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema of a tool's input model, in the form LLM and MCP clients take."""
    schema = model.model_json_schema()
    if "$defs" in schema:
        raise TypeError(f"{model.__name__}: tool arguments must be flat (no nested models)")
    schema.pop("title", None)
    schema.pop("description", None)  # the tool's own description is TOOL_DESCRIPTIONS
    schema["properties"] = {name: _argument(prop) for name, prop in schema["properties"].items()}
    schema.setdefault("required", [])
    return schema


TOOL_SCHEMAS: dict[str, dict[str, Any]] = {name: tool_schema(inputs) for name, (inputs, _) in TOOL_MODELS.items()}

TOOL_NAMES: tuple[str, ...] = tuple(TOOL_SCHEMAS)


def openai_tools() -> list[dict[str, Any]]:
    """The tools for OpenAI-style function calling (``tools=[...]``)."""
    return [
        {"type": "function", "function": {"name": n, "description": TOOL_DESCRIPTIONS[n],
                                          "parameters": copy.deepcopy(TOOL_SCHEMAS[n])}}
        for n in TOOL_NAMES
    ]


def anthropic_tools() -> list[dict[str, Any]]:
    """The tools for the Anthropic Messages API (``tools=[...]``)."""
    return [
        {"name": n, "description": TOOL_DESCRIPTIONS[n], "input_schema": copy.deepcopy(TOOL_SCHEMAS[n])}
        for n in TOOL_NAMES
    ]
