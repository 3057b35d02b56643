"""The models.dev catalog a managed ``opencode serve`` reads (``models_catalog``), on the real server.

What OpenCode lists under ``GET /provider`` shows which catalog it loaded: its own names every
provider models.dev knows, the empty one only those the config defines, a pinned file its own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ocbridge.bridge.engines.opencode.catalog import EMPTY_CATALOG_NAME
from ocbridge.bridge.engines.opencode.server import OpenCodeProcess
from ocbridge.bridge.engines.opencode.settings import OpenCodeSettings
from ocbridge.bridge.offline_model.configs import opencode_provider_config
from ocbridge.bridge.offline_model.server import OfflineModelServer

ROOT = Path(__file__).resolve().parents[2]
OPENCODE = ROOT / ".tools/npm/node_modules/.bin/opencode"

pytestmark = [pytest.mark.opencode, pytest.mark.slow]

PINNED_CATALOG = {"pinned": {
    "id": "pinned", "name": "Pinned", "npm": "@ai-sdk/openai-compatible", "api": "http://127.0.0.1:9/v1", "env": [],
    "models": {"p1": {
        "id": "p1", "name": "P1", "tool_call": True, "reasoning": False, "attachment": False, "temperature": True,
        "release_date": "2025-01-01", "open_weights": True, "cost": {"input": 0, "output": 0},
        "limit": {"context": 1000, "output": 100},
    }},
}}


Served = tuple[aiohttp.ClientSession, str, OpenCodeProcess]


@asynccontextmanager
async def opencode(tmp_path: Path, catalog: str, config: dict[str, Any]) -> AsyncIterator[Served]:
    if not OPENCODE.exists():
        pytest.fail("opencode is not installed: run scripts/setup")
    server = OpenCodeProcess(OpenCodeSettings(
        binary=str(OPENCODE), state_dir=tmp_path / f"state-{len(list(tmp_path.iterdir()))}", config=config,
        models_catalog=catalog, extra_path=[str(ROOT / ".venv/bin")],
    ))
    base = await server.start()
    auth = {"Authorization": aiohttp.encode_basic_auth("opencode", server.password)}
    try:
        async with aiohttp.ClientSession(headers=auth, timeout=aiohttp.ClientTimeout(total=60)) as http:
            yield http, base, server
    finally:
        await server.stop()


async def provider_ids(http: aiohttp.ClientSession, base: str, directory: Path) -> dict[str, list[str]]:
    async with http.get(f"{base}/provider", params={"directory": str(directory)}) as response:
        response.raise_for_status()
        return {p["id"]: sorted(p["models"]) for p in (await response.json())["all"]}


async def test_opencode_lists_what_the_chosen_catalog_holds(tmp_path: Path) -> None:
    config = opencode_provider_config("http://127.0.0.1:9/v1")
    del config["enabled_providers"]  # every catalog provider shows
    async with opencode(tmp_path, "bundled", config) as (http, base, _):
        bundled = await provider_ids(http, base, tmp_path)
    assert {"offline", "anthropic", "openai"} <= set(bundled) and len(bundled) > 20
    async with opencode(tmp_path, "none", config) as (http, base, _):
        assert await provider_ids(http, base, tmp_path) == {"offline": ["scripted"]}

    pinned = tmp_path / "api.json"
    pinned.write_text(json.dumps(PINNED_CATALOG))
    async with opencode(tmp_path, str(pinned), {**config, "enabled_providers": ["offline", "pinned"]}) as (
        http, base, _,
    ):
        assert await provider_ids(http, base, tmp_path) == {"offline": ["scripted"], "pinned": ["p1"]}


async def test_the_default_gives_a_config_of_its_own_providers_the_empty_catalog(tmp_path: Path) -> None:
    """The offline model's config enables only the provider it defines: ``auto`` hands OpenCode the
    empty catalog, and prompts (and the title request on the small model) work as before."""
    model = OfflineModelServer()
    url = await model.start()
    workspace = tmp_path / "ws"
    workspace.mkdir()
    try:
        async with opencode(tmp_path, "auto", opencode_provider_config(url + "/v1")) as (http, base, server):
            environ = dict(item.split(b"=", 1) for item in
                           Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0") if b"=" in item)
            catalog = Path(environ[b"OPENCODE_MODELS_PATH"].decode())
            assert catalog.name == EMPTY_CATALOG_NAME and json.loads(catalog.read_text()) == {}
            params = {"directory": str(workspace)}
            async with http.post(f"{base}/session", params=params, json={}) as response:
                session = (await response.json())["id"]
            body = {"parts": [{"type": "text", "text": "create a.txt with content catalog"}]}
            async with http.post(f"{base}/session/{session}/message", params=params, json=body) as response:
                reply = await response.json()
            assert reply["info"].get("error") is None
            assert (workspace / "a.txt").read_text() == "catalog"
    finally:
        await model.stop()
