"""The three Station tools: what they tell the agent and what they do.

``station_kv_get`` (``key``, ``bucket``) -> ``{"value": string | null}``;
``station_kv_set`` (``key``, ``value``, ``bucket``) -> ``{"success": true}``;
``station_session_info`` (``sessionName``) -> ``{sessionName, workspaceName, workspacePath,
gitBranch, gitCommit, messageCount, created, lastUsed}`` or ``{"error": "Session not found"}``.

These are the names, arguments and result shapes of the TypeScript plugin Station's prompts were
written for. Values are read from and written to the same NATS KV buckets Station and
:mod:`ocbridge.client` use, so a write is visible to them at once. Every check is in
:mod:`.policy`; a refused or failed call is an MCP error result with a message for the agent.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from ocbridge.bridge.redact import Redactor
from ocbridge.bridge.storage.stores import KeyValueStore
from ocbridge.bridge.workspace.git import GitSettings
from ocbridge.bridge.workspace.git.repo import current_branch, head_commit, is_repo
from ocbridge.bridge.workspace.paths import confine
from ocbridge.client.kv import json_object
from ocbridge.client.protocol import SessionState

from .grants import Grant
from .policy import Bucket, KeyPolicy, ToolRefused
from .protocol import ToolResult, ToolSpec

__all__ = ["KV_GET", "KV_SET", "SESSION_INFO", "StationTools", "tool_specs"]

log = logging.getLogger(__name__)

KV_GET = "station_kv_get"
KV_SET = "station_kv_set"
SESSION_INFO = "station_session_info"

_BUCKET = {
    "type": "string",
    "enum": ["state", "sessions"],
    "default": "state",
    "description": '"state" (default): free-form workflow state shared with Station. "sessions": the '
    "records of coding sessions, keyed by session name.",
}


def tool_specs(max_key: int, max_value: int) -> list[ToolSpec]:
    """The tools as ``tools/list`` shows them (limits from the configuration)."""
    key = {
        "type": "string",
        "minLength": 1,
        "maxLength": max_key,
        "description": "The key: letters, digits and - / _ = in parts separated by single dots "
        '(e.g. "plan.step-2").',
    }
    return [
        ToolSpec(
            KV_GET,
            "Read a value from Station's key-value state: what the Station workflow or an earlier step "
            'stored for this work. Returns {"value": "<text>"}, or {"value": null} when the key is not '
            "set. Keys that hold credentials are never readable.",
            {"type": "object", "properties": {"key": key, "bucket": _BUCKET}, "required": ["key"],
             "additionalProperties": False},
        ),
        ToolSpec(
            KV_SET,
            "Store a text value in Station's key-value state, where the Station workflow and later steps "
            f'read it at once. Returns {{"success": true}}. Values are text of at most {max_value} bytes '
            "(encode structured data as JSON); credentials are refused.",
            {"type": "object",
             "properties": {"key": key, "value": {"type": "string", "description": "The text to store."},
                            "bucket": _BUCKET},
             "required": ["key", "value"], "additionalProperties": False},
        ),
        ToolSpec(
            SESSION_INFO,
            "Describe a coding session: its workspace, git branch and commit, message count, creation "
            "and last use. Without sessionName, the session this task runs in. Returns "
            '{"error": "Session not found"} for an unknown session.',
            {"type": "object",
             "properties": {"sessionName": {"type": "string", "minLength": 1, "maxLength": max_key,
                                            "description": "The session's name (default: this task's session)."}},
             "additionalProperties": False},
        ),
    ]


class StationTools:
    """Runs the tools for a caller identified by its :class:`~.grants.Grant`."""

    def __init__(
        self,
        *,
        state: KeyValueStore,
        sessions: KeyValueStore,
        policy: KeyPolicy,
        redactor: Redactor,
        workspace_root: Path,
        git: GitSettings | None = None,
    ) -> None:
        self._stores: dict[Bucket, KeyValueStore] = {"state": state, "sessions": sessions}
        self.policy = policy
        self._redactor = redactor
        self._root = workspace_root.resolve()
        self._git = git or GitSettings()
        self.specs = tool_specs(policy.settings.max_key_length, policy.settings.max_value_bytes)
        self._allowed = {spec.name: set(spec.input_schema["properties"]) for spec in self.specs}
        #: Tool calls answered so far (refusals and failures included).
        self.calls = 0

    async def call(self, name: str, arguments: dict[str, Any], grant: Grant) -> ToolResult:
        """Run tool ``name``; a refusal or failure is an error result, never an exception."""
        self.calls += 1
        extra = sorted(set(arguments) - self._allowed.get(name, set()))
        if not grant.live:
            return ToolResult(error="the task this tool connection served is over")
        tasks = ",".join(sorted(grant.runs))
        try:
            if extra:
                raise ToolRefused(f"unexpected argument(s): {', '.join(a[:40] for a in extra[:5])}")
            async with asyncio.timeout(self.policy.settings.call_timeout):
                if name == KV_GET:
                    result = await self._kv_get(arguments, grant)
                elif name == KV_SET:
                    result = await self._kv_set(arguments, grant)
                else:
                    result = await self._session_info(arguments, grant)
        except ToolRefused as exc:
            log.info("task %s: agent tool %s refused: %s", tasks, name, exc)
            return ToolResult(error=self._redactor.text(str(exc)))
        except TimeoutError:
            log.warning("task %s: agent tool %s timed out", tasks, name)
            return ToolResult(error=f"{name} timed out after {self.policy.settings.call_timeout:.0f}s; try again")
        except Exception as exc:
            log.warning("task %s: agent tool %s failed: %s", tasks, name, self._redactor.text(repr(exc)))
            return ToolResult(error=f"{name} failed: {self._redactor.text(type(exc).__name__)}; try again later")
        log.debug("task %s: agent tool %s done", tasks, name)
        return ToolResult(self._redactor.data(result))

    async def _kv_get(self, args: dict[str, Any], grant: Grant) -> dict[str, Any]:
        policy = self.policy
        bucket = policy.bucket(args.get("bucket"))
        key = policy.key(args.get("key"), bucket)
        policy.check(bucket, key, grant.caller(), write=False)
        raw = await self._stores[bucket].get(key)
        return {"value": None if raw is None else policy.readable(key, raw)}

    async def _kv_set(self, args: dict[str, Any], grant: Grant) -> dict[str, Any]:
        policy = self.policy
        bucket = policy.bucket(args.get("bucket"))
        key = policy.key(args.get("key"), bucket)
        if "value" not in args:
            raise ToolRefused("value is required")
        value = policy.value(args["value"])
        policy.check(bucket, key, grant.caller(), write=True)
        await self._stores[bucket].put(key, value.encode())
        return {"success": True}

    async def _session_info(self, args: dict[str, Any], grant: Grant) -> dict[str, Any]:
        caller = grant.caller()
        name = args.get("sessionName")
        if name is None:
            if caller.session is None:
                raise ToolRefused("several sessions share this workspace right now: pass sessionName")
            name = caller.session
        name = self.policy.key(name, "sessions")
        self.policy.own_session(name, caller)
        raw = await self._stores["sessions"].get(name)
        try:
            state = SessionState.model_validate(record) if (record := json_object(raw)) is not None else None
        except ValueError:
            state = None
        if state is None:
            return {"error": "Session not found"}
        branch, commit = await self._git_facts(state)
        return {
            "sessionName": state.session_name,
            "workspaceName": state.workspace_name,
            "workspacePath": state.workspace_path,
            "gitBranch": branch,
            "gitCommit": commit,
            "messageCount": state.message_count,
            "created": state.created,
            "lastUsed": state.last_used,
        }

    async def _git_facts(self, state: SessionState) -> tuple[str | None, str | None]:
        """Branch and commit of the session's workspace as git has them now (the record is only
        updated after each task), else as last recorded."""
        recorded = (state.git.branch, state.git.last_commit) if state.git else (None, None)
        try:
            path = confine(self._root, state.workspace_path)
        except Exception:
            return recorded
        if not await asyncio.to_thread(is_repo, path):
            return recorded
        options = {"settings": self._git, "redactor": self._redactor}
        branch, commit = await asyncio.gather(current_branch(path, **options), head_commit(path, **options))
        return branch or recorded[0], commit or recorded[1]
