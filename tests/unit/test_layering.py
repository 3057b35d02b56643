"""The architecture as rules on imports: the wire contract depends on nothing of ours, the client
depends on the sidecar only through its one seam, and nothing imports the old top-level names."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: What a module of the wire contract may import besides itself.
PROTOCOL_ALLOWED = {"pydantic", "__future__"}


def imports_of(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative ones resolved against its package)."""
    package = ["ocbridge", *path.relative_to(ROOT).with_suffix("").parts[:-1]]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            else:
                found.add(node.module or "")
    return found


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", modules("client/protocol"), ids=lambda p: p.name)
def test_protocol_imports_only_itself_pydantic_and_stdlib(path: Path):
    for name in imports_of(path):
        top = name.split(".")[0]
        if name.startswith("ocbridge."):
            assert name.startswith("ocbridge.client.protocol"), f"{path.name} imports {name}"
        else:
            assert top in PROTOCOL_ALLOWED or top in sys.stdlib_module_names, f"{path.name} imports {name}"
        assert top not in {"nats", "aiohttp", "asyncio", "socket", "subprocess"}, f"{path.name} does I/O via {name}"


def test_client_reaches_the_sidecar_only_through_its_seam():
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in modules("client")
        if path.name != "_sidecar.py"
        for name in imports_of(path)
        if name.startswith("ocbridge.bridge")
    ]
    assert offenders == []
    seam = (ROOT / "client/_sidecar.py").read_text()
    assert "ocbridge.bridge.cli" in seam and "ocbridge.bridge.inprocess" in seam


@pytest.mark.parametrize("folder", ["client", "bridge", "tests", "bench", "scripts"])
def test_nothing_imports_the_old_top_level_names(folder: str):
    stale = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in modules(folder)
        for name in imports_of(path)
        if name.split(".")[0] in {"client", "bridge"}
    ]
    assert stale == []
