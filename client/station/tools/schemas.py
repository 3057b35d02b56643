"""JSON Schemas of the six tools' inputs, written for an LLM: short, every argument described,
required ones listed, nothing else accepted. Also in the shapes OpenAI and Anthropic expect."""

from __future__ import annotations

import copy
from typing import Any

_SESSION = {"type": "string", "description": "Coding session ID returned by coding_open."}


def _obj(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


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

TOOL_SCHEMAS: dict[str, dict[str, Any]] = {
    "coding_open": _obj(
        {
            "repo_url": {"type": "string", "description": "Git repository to clone (HTTPS, SSH or git URL)."},
            "branch": {"type": "string", "description": "Branch to check out after cloning (default: the remote's)."},
            "workspace_path": {
                "type": "string",
                "description": "An existing workspace folder to work in. Omit for a managed workspace.",
            },
            "title": {"type": "string", "description": "Session title, to find the session again later."},
            "scope": {
                "type": "string",
                "enum": ["agent", "workflow"],
                "description": "Workspace lifetime: 'agent' (cleaned up with the session, default) or "
                "'workflow' (kept across the steps of a workflow).",
            },
            "scope_id": {"type": "string", "description": "Workflow ID when scope is 'workflow'."},
            "existing_session_id": {
                "type": "string",
                "description": "Continue an earlier session: its ID (ses_...) or part of its title "
                "(case-insensitive).",
            },
        },
        [],
    ),
    "code": _obj(
        {
            "session_id": _SESSION,
            "instruction": {
                "type": "string",
                "description": "What the coding assistant should do, e.g. 'Fix the null pointer exception in auth.go'.",
            },
            "context": {"type": "string", "description": "Additional context about the task (optional)."},
            "files": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Specific files to focus on (optional).",
            },
        },
        ["session_id", "instruction"],
    ),
    "coding_branch": _obj(
        {
            "session_id": _SESSION,
            "branch": {"type": "string", "description": "Branch name, e.g. 'feature/add-tests'."},
            "create": {"type": "boolean", "default": True,
                       "description": "Create the branch if it does not exist. Default: true."},
        },
        ["session_id", "branch"],
    ),
    "coding_commit": _obj(
        {
            "session_id": _SESSION,
            "message": {"type": "string", "description": "Commit message describing the changes."},
            "add_all": {"type": "boolean", "default": True,
                        "description": "Stage all changes (new, modified, deleted files) first. Default: true."},
        },
        ["session_id", "message"],
    ),
    "coding_push": _obj(
        {
            "session_id": _SESSION,
            "remote": {"type": "string", "default": "origin", "description": "Remote name. Default: origin."},
            "branch": {"type": "string", "description": "Branch to push. Default: the current branch."},
            "set_upstream": {"type": "boolean", "default": False,
                             "description": "Set the upstream of the branch (git push -u). Default: false."},
        },
        ["session_id"],
    ),
    "coding_close": _obj(
        {
            "session_id": _SESSION,
            "workspace_id": {"type": "string", "description": "workspace_id returned by coding_open (optional)."},
            "success": {"type": "boolean", "default": True,
                        "description": "Whether the coding work succeeded (the on_success cleanup policy "
                        "keeps the workspace of failed work). Default: true."},
        },
        ["session_id"],
    ),
}

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
