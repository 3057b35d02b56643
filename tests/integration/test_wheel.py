"""The built distribution, as a user installs it: namespaced packages only, and a client that runs
with nats-py and pydantic alone.

The wheel is built offline (no build isolation). The client-only environment is a fresh venv that
sees exactly the distributions nats-py and pydantic need, taken from this environment (no index is
reached), so any import of the sidecar's dependencies from the client would fail here.
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
#: The thin client's runtime dependencies (pyproject's [project] dependencies).
CLIENT_DISTRIBUTIONS = ("nats-py", "pydantic")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True, capture_output=True, timeout=300,
    )
    (built,) = out.glob("opencode_bridge-*.whl")
    return built


def test_wheel_holds_only_the_ocbridge_namespace_and_every_package(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"ocbridge"}
    # No ocbridge/__init__.py: a namespace package, so other distributions could share it.
    assert "ocbridge/__init__.py" not in names
    packaged = {str(Path(name).parent) for name in names if name.endswith("/__init__.py")}
    in_tree = {
        "ocbridge/" + str(init.parent.relative_to(ROOT))
        for folder in ("client", "bridge")
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert packaged == in_tree, "pyproject's package list and the folders differ"
    modules = {name for name in names if name.endswith(".py")}
    assert "ocbridge/client/protocol/tasks.py" in modules and "ocbridge/bridge/jetstream/worker.py" in modules
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ocbridge = ocbridge.client.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def _closure(names: tuple[str, ...]) -> set[str]:
    """The distributions ``names`` need at run time (no extras), themselves included."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        dist = metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower()
        if key in seen:
            continue
        seen.add(key)
        for spec in dist.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def _client_site(target: Path) -> Path:
    """A folder with links to the top-level modules of the client's dependency closure only."""
    target.mkdir()
    for name in _closure(CLIENT_DISTRIBUTIONS):
        dist = metadata.distribution(name)
        for file in dist.files or []:
            top = file.parts[0]
            if top.endswith((".dist-info", ".pth")) or top == ".." or top.startswith("__"):
                continue
            source = Path(dist.locate_file(top))
            link = target / top
            if source.exists() and not link.exists():
                link.symlink_to(source)
    return target


@pytest.fixture(scope="module")
def client_venv(wheel: Path, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("client-only")
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = _client_site(base / "deps")
    (Path(site) / "client-deps.pth").write_text(f"{deps}\n")
    return env_dir


def _run(env_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(env_dir / "bin" / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60,
                          cwd=env_dir.parent)


def test_client_alone_runs_the_cli_and_imports_without_the_sidecar_dependencies(client_venv: Path):
    help_text = _run(client_venv, "ocbridge", "run", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "--workspace" in help_text.stdout
    imported = _run(client_venv, "python", "-c",
                    "import ocbridge.client, ocbridge.client.protocol, ocbridge.client.station; print('ok')")
    assert imported.stdout.strip() == "ok", imported.stderr
    # The venv really lacks the sidecar's dependencies, so the checks above mean something.
    missing = _run(client_venv, "python", "-c", "import aiohttp")
    assert missing.returncode != 0 and "No module named 'aiohttp'" in missing.stderr


def test_client_alone_explains_how_to_get_the_sidecar(client_venv: Path):
    served = _run(client_venv, "ocbridge", "serve")
    assert served.returncode == 2
    assert "pip install 'opencode-bridge[bridge]'" in served.stderr
