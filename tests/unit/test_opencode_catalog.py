"""Which models.dev catalog the OpenCode engines point OpenCode at (``models_catalog``)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from ocbridge.bridge.config import load_config
from ocbridge.bridge.engines.base import EngineError
from ocbridge.bridge.engines.opencode.catalog import (
    EMPTY_CATALOG_NAME,
    catalog_environment,
    defines_every_enabled_provider,
)

OWN_PROVIDER = {"npm": "@ai-sdk/openai-compatible", "models": {"m": {"name": "M"}}}


@pytest.mark.parametrize(("config", "expected"), [
    ({"enabled_providers": ["mine"], "provider": {"mine": OWN_PROVIDER}}, True),
    ({"enabled_providers": ["mine", "b"], "provider": {"mine": OWN_PROVIDER, "b": OWN_PROVIDER}}, True),
    # Not limited to its own providers: a catalog provider with a key in the environment is usable.
    ({"provider": {"mine": OWN_PROVIDER}}, False),
    ({"enabled_providers": [], "provider": {"mine": OWN_PROVIDER}}, False),
    # An enabled provider the config only tunes (models.dev defines its package and models).
    ({"enabled_providers": ["anthropic"], "provider": {"anthropic": {"options": {"timeout": 5}}}}, False),
    ({"enabled_providers": ["mine"], "provider": {"mine": {"npm": "@ai-sdk/openai-compatible"}}}, False),
    ({"enabled_providers": ["mine", "anthropic"], "provider": {"mine": OWN_PROVIDER}}, False),
    ({"enabled_providers": "mine", "provider": {"mine": OWN_PROVIDER}}, False),
    ({}, False),
])
def test_auto_needs_every_enabled_provider_defined(config: dict[str, Any], expected: bool) -> None:
    assert defines_every_enabled_provider(config) is expected


def test_auto_and_none_write_an_empty_catalog_everyone_can_read(tmp_path: Path) -> None:
    own = {"enabled_providers": ["mine"], "provider": {"mine": OWN_PROVIDER}}
    for choice, config in (("auto", own), ("none", {})):
        env = catalog_environment(choice, config, tmp_path)
        path = Path(env["OPENCODE_MODELS_PATH"])
        assert path == tmp_path / EMPTY_CATALOG_NAME and json.loads(path.read_text()) == {}
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == [EMPTY_CATALOG_NAME]  # no temporary left


def test_the_empty_catalog_replaces_a_link_instead_of_writing_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    state = tmp_path / "state"
    state.mkdir()
    (state / EMPTY_CATALOG_NAME).symlink_to(victim)
    catalog_environment("none", {}, state)
    assert victim.read_text() == "keep"
    assert not (state / EMPTY_CATALOG_NAME).is_symlink()


def test_bundled_and_auto_without_own_providers_keep_opencodes_catalog(tmp_path: Path) -> None:
    assert catalog_environment("bundled", {"enabled_providers": ["mine"], "provider": {"mine": OWN_PROVIDER}},
                               tmp_path) == {}
    assert catalog_environment("auto", {"provider": {"mine": OWN_PROVIDER}}, tmp_path) == {}
    assert list(tmp_path.iterdir()) == []


def test_a_catalog_file_is_checked(tmp_path: Path) -> None:
    pinned = tmp_path / "api.json"
    pinned.write_text(json.dumps({"mine": {"id": "mine", "models": {}}}))
    assert catalog_environment(str(pinned), {}, tmp_path / "state") == {"OPENCODE_MODELS_PATH": str(pinned)}
    for content, message in (("[1, 2]", "holds no JSON object"), ("{", "not a readable JSON file")):
        pinned.write_text(content)
        with pytest.raises(EngineError, match=message):
            catalog_environment(str(pinned), {}, tmp_path / "state")
    with pytest.raises(EngineError, match="not a readable JSON file"):
        catalog_environment(str(tmp_path / "missing.json"), {}, tmp_path / "state")


def test_models_catalog_is_a_setting_of_both_opencode_engines() -> None:
    config = load_config(environ={"OCBRIDGE_OPENCODE__MODELS_CATALOG": "bundled",
                                  "OCBRIDGE_OPENCODE_CLI__MODELS_CATALOG": "/etc/models.json"})
    assert (config.opencode.models_catalog, config.opencode_cli.models_catalog) == ("bundled", "/etc/models.json")
    assert load_config(environ={}).opencode.models_catalog == "auto"
