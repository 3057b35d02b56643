"""``ocbridge mcp``: Station's six coding tools as an MCP server over stdio.

Any MCP-capable agent (Claude Desktop, Cursor, an ``mcp`` client session...) can then open
sessions, run coding tasks and commit/push through whichever backend Station's ``coding:``
configuration selects::

    ocbridge mcp --config ~/.config/station/config.yaml

The tool input schemas are :data:`client.tools.TOOL_SCHEMAS`; each result is the tool's output as
JSON text (and as structured content). Failures of the work itself come back as
``success: false`` results; invalid arguments and failed ``coding_open`` / ``coding_close`` come
back as tool errors (``isError``) whose text says what went wrong.

Needs the ``mcp`` package: ``pip install 'opencode-bridge[mcp]'``. Works with the SDK's low-level
server of both major versions (1.x decorators, 2.x constructor handlers).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ocbridge.client.station.config import StationConfigError, default_config_path, load_station_config

from .tools import TOOL_DESCRIPTIONS, TOOL_NAMES, TOOL_SCHEMAS, CodingToolError, CodingTools, tools_from_config

log = logging.getLogger(__name__)

SERVER_NAME = "ocbridge-coding"


def _tool_list(types: Any) -> list[Any]:
    # model_validate with the camelCase wire names works for both SDK majors (v1 field names,
    # v2 aliases).
    return [
        types.Tool.model_validate(
            {"name": name, "description": TOOL_DESCRIPTIONS[name], "inputSchema": TOOL_SCHEMAS[name]}
        )
        for name in TOOL_NAMES
    ]


async def run_tool(tools: CodingTools, name: str, arguments: Mapping[str, Any] | None) -> tuple[dict | None, str]:
    """Run one tool: ``(output, text)`` on success, ``(None, error message)`` on a tool error."""
    try:
        output = await tools.call(name, arguments or {})
    except CodingToolError as exc:
        return None, str(exc)
    except Exception as exc:  # an MCP client must get an answer whatever happens
        log.exception("tool %s failed", name)
        return None, f"{name}: internal error: {exc}"
    return output, json.dumps(output, indent=2)


def build_server(tools: CodingTools) -> Any:
    """The MCP low-level server exposing ``tools``."""
    from mcp import types
    from mcp.server.lowlevel import Server

    def result(output: dict | None, text: str) -> Any:
        data: dict[str, Any] = {"content": [{"type": "text", "text": text}], "isError": output is None}
        if output is not None:
            data["structuredContent"] = output
        return types.CallToolResult.model_validate(data)

    if "on_call_tool" in inspect.signature(Server.__init__).parameters:  # mcp >= 2

        async def on_list_tools(ctx: Any, params: Any) -> Any:
            return types.ListToolsResult(tools=_tool_list(types))

        async def on_call_tool(ctx: Any, params: Any) -> Any:
            return result(*await run_tool(tools, params.name, params.arguments))

        return Server(SERVER_NAME, on_list_tools=on_list_tools, on_call_tool=on_call_tool)

    server = Server(SERVER_NAME)  # pragma: no cover - mcp 1.x

    @server.list_tools()  # pragma: no cover - mcp 1.x
    async def list_tools() -> list[Any]:
        return _tool_list(types)

    @server.call_tool()  # pragma: no cover - mcp 1.x
    async def call_tool(name: str, arguments: dict[str, Any]) -> Any:
        output, text = await run_tool(tools, name, arguments)
        if output is None:
            raise RuntimeError(text)  # 1.x turns a raised error into an isError result
        return [types.TextContent(type="text", text=text)]

    return server


async def serve_stdio(tools: CodingTools) -> None:
    """Serve ``tools`` on stdin/stdout until the client disconnects, then stop the backend."""
    from mcp.server.stdio import stdio_server

    server = build_server(tools)
    try:
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())
    finally:
        await tools.aclose()


def main(args: argparse.Namespace | None = None) -> int:
    """Entry point of ``ocbridge mcp`` (``args.config``: Station's config.yaml or a coding block)."""
    # stdout is the MCP wire: every log line goes to stderr.
    logging.basicConfig(level=os.environ.get("OCBRIDGE_LOG_LEVEL", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import mcp  # noqa: F401
    except ImportError:
        print("ocbridge mcp needs the MCP SDK: pip install 'opencode-bridge[mcp]'", file=sys.stderr)
        return 2
    config_path = getattr(args, "config", None) or default_config_path()
    try:
        config = load_station_config(Path(config_path) if config_path else None, os.environ)
    except StationConfigError as exc:
        print(f"ocbridge mcp: {exc}", file=sys.stderr)
        return 2
    log.info("coding backend %s (config %s)", config.backend, config_path or "none: defaults and environment")
    try:
        asyncio.run(serve_stdio(tools_from_config(config)))
    except KeyboardInterrupt:
        return 130
    return 0
