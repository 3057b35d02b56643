"""The real image: built with podman by ``scripts/image`` (a warm cache after the first run), run
against a nats-server with user/password auth on the host, one task sent from the host through it,
its workspace file on the host, health and metrics, the image's own healthcheck, a graceful stop on
SIGTERM, and nothing left running.

The container uses the host's network (the simplest way to reach the host's NATS here); the
offline model runs inside the sidecar, so nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ocbridge.bridge.jetstream.natsd import free_port
from ocbridge.bridge.processes import find_binary
from ocbridge.client.client import CodingClient
from ocbridge.client.connection import NatsOptions
from ocbridge.client.protocol import TaskStatus

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SCRIPT = ROOT / "scripts" / "image"
#: The image's non-root user.
IMAGE_UID = 10001
#: The size the image must stay under.
SIZE_BUDGET = 600_000_000

# The first (cold) build makes the Debian base and downloads everything: minutes on 2 cores.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def image() -> str:
    """``scripts/image``: builds (or finds up to date) the image and prints ``name size``."""
    done = subprocess.run([str(IMAGE_SCRIPT)], capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert done.returncode == 0, f"scripts/image failed:\n{done.stderr[-4000:]}"
    name = done.stdout.strip().splitlines()[-1].split()[0]
    assert name.startswith("localhost/opencode-bridge:"), done.stdout
    return name


async def podman(*args: str, timeout: float = 120.0, env: dict[str, str] | None = None,
                 check: bool = True) -> tuple[int, str]:
    """``scripts/image podman ARGS`` (podman with the project's engine settings): exit code and
    output (stdout and stderr together). Secrets go through ``env``, never ``args``."""
    proc = await asyncio.create_subprocess_exec(
        str(IMAGE_SCRIPT), "podman", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=env, cwd=ROOT, start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    # podman without systemd complains that it cannot set up healthcheck timers: noise.
    text = "\n".join(line for line in text.splitlines() if "systemd" not in line)
    if check and proc.returncode:
        raise AssertionError(f"podman {' '.join(args)} exited with {proc.returncode}:\n{text[-3000:]}")
    return proc.returncode or 0, text


class AuthNats:
    """A real nats-server with JetStream that admits one user with a password, on loopback."""

    def __init__(self, folder: Path, user: str, password: str) -> None:
        self.folder, self.user, self.password = folder, user, password
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def __aenter__(self) -> AuthNats:
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "nats.conf"
        conf.touch(mode=0o600)
        conf.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f'jetstream {{ store_dir: "{self.folder / "js"}" }}\n'
            f'authorization {{ user: "{self.user}", password: "{self.password}" }}\n'
        )
        self.proc = await asyncio.create_subprocess_exec(
            find_binary("nats-server"), "-c", str(conf), "--log", str(self.folder / "nats.log"),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                line = await asyncio.wait_for(reader.readline(), 1.0)
                writer.close()
                if line.startswith(b"INFO"):
                    return self
            except (OSError, TimeoutError):
                pass
            if self.proc.returncode is not None or loop.time() > deadline:
                await self.__aexit__()
                raise RuntimeError(f"nats-server did not start: {(self.folder / 'nats.log').read_text()[-2000:]}")
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc_info: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@contextlib.asynccontextmanager
async def container(image: str, *args: str, env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """``podman run -d`` the image; the container is removed on the way out, whatever happened."""
    name = f"ocbridge-test-{uuid.uuid4().hex[:8]}"
    try:
        # --health-interval=disable: the healthcheck stays in the image (run by hand below); podman
        # would otherwise try to schedule it through systemd.
        await podman("run", "-d", "--name", name, "--health-interval=disable", *args, image, env=env)
        yield name
    finally:
        await podman("rm", "--force", "--volumes", "--time", "5", name, check=False, timeout=60)
    _, left = await podman("ps", "--all", "--quiet", "--filter", f"name=^{name}$", check=False)
    assert not left.strip(), f"container {name} left behind"


async def wait_ready(name: str, http: str, timeout: float = 120.0) -> None:
    """Until ``/readyz`` answers 200; fails with the container's log when it stops or never does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{http}/readyz") as response:
                    if response.status == 200:
                        return
            _, running = await podman("inspect", "--format", "{{.State.Running}}", name, check=False)
            if running.strip() != "true" or loop.time() > deadline:
                _, logs = await podman("logs", name, check=False)
                state = running.strip()
                raise AssertionError(f"container {name} never became ready (running: {state}):\n{logs[-4000:]}")
            await asyncio.sleep(0.25)


async def test_image_runs_a_task_from_the_host_and_stops_on_sigterm(image: str, tmp_path: Path):
    user, password = "ocbridge", secrets.token_urlsafe(18)
    workspaces, data = tmp_path / "workspaces", tmp_path / "data"
    for folder in (workspaces, data):
        folder.mkdir()
        folder.chmod(0o777)  # the image's user (uid 10001) writes here
    http_port = free_port()
    http = f"http://127.0.0.1:{http_port}"
    # The password reaches the container through podman's environment (`-e NAME`), not argv.
    env = {**os.environ, "OCBRIDGE_NATS_PASSWORD": password}

    async with AuthNats(tmp_path / "nats", user, password) as nats, container(
        image,
        "--network=host",
        "-v", f"{workspaces}:/workspaces", "-v", f"{data}:/data",
        "-e", f"OCBRIDGE_NATS_URL={nats.url}", "-e", f"OCBRIDGE_NATS_USER={user}", "-e", "OCBRIDGE_NATS_PASSWORD",
        "-e", "OCBRIDGE_OFFLINE_MODEL=true", "-e", f"OCBRIDGE_HTTP_PORT={http_port}",
        "-e", "OCBRIDGE_SHUTDOWN_GRACE=20",
        env=env,
    ) as name:
        await wait_ready(name, http)

        options = NatsOptions(url=nats.url, user=user, password=password, name="image-test")
        client = await CodingClient.connect(options)
        try:
            handle = await client.submit("create hello.txt with content hi", workspace="demo", timeout=120)
            events = [event async for event in handle]
            result = await handle.result(timeout=120)
        finally:
            await client.close()
        assert result.status == TaskStatus.COMPLETED, result.error
        # Live events from inside the container, in order.
        assert [event.seq for event in events] == list(range(1, len(events) + 1))
        assert any(event.tool and event.tool.name == "write" for event in events), [e.type for e in events]
        # The agent wrote inside the container; the file is in the host folder mounted as the volume.
        written = workspaces / "demo" / "hello.txt"
        assert written.read_text() == "hi"

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(f"{http}/healthz") as response:
                assert response.status == 200
            async with session.get(f"{http}/readyz") as response:
                assert response.status == 200
                assert json.loads(await response.text())["ready"] is True
            async with session.get(f"{http}/metrics") as response:
                assert response.status == 200
                metrics = await response.text()
        completed = re.search(r"^ocbridge_tasks_completed_total(?:\{[^}]*\})? (\S+)$", metrics, re.M)
        assert completed and float(completed.group(1)) == 1, metrics[:2000]

        # The image's HEALTHCHECK (podman runs it only when asked, without systemd).
        code, out = await podman("healthcheck", "run", name, check=False)
        assert code == 0, out

        # SIGTERM (podman stop), with a kill only after 60 s: the sidecar stops by itself.
        await podman("stop", "--time", "60", name, timeout=120)
        _, state = await podman("inspect", "--format", "{{.State.ExitCode}} {{.State.OOMKilled}}", name)
        assert state.split() == ["0", "false"], state  # 137 would be the kill
        _, logs = await podman("logs", name)
        assert "signal received: stopping" in logs
        assert password not in logs


async def test_image_runs_the_agent_under_its_own_user(image: str, tmp_path: Path):
    """``--user 0`` and ``OCBRIDGE_AGENT_USER=agent``: the agent runs as the image's ``agent`` user
    (uid 10002), owns the workspace, and cannot read the sidecar's data folder."""
    workspaces, data = tmp_path / "workspaces", tmp_path / "data"
    for folder in (workspaces, data):
        folder.mkdir()
    http_port = free_port()
    async with AuthNats(tmp_path / "nats", "ocbridge", "agent-test-pw") as nats, container(
        image, "--network=host", "--user", "0",
        "-v", f"{workspaces}:/workspaces", "-v", f"{data}:/data",
        "-e", f"OCBRIDGE_NATS_URL={nats.url}", "-e", "OCBRIDGE_NATS_USER=ocbridge",
        "-e", "OCBRIDGE_NATS_PASSWORD=agent-test-pw", "-e", "OCBRIDGE_AGENT_USER=agent",
        "-e", "OCBRIDGE_OFFLINE_MODEL=true", "-e", f"OCBRIDGE_HTTP_PORT={http_port}",
    ) as name:
        await wait_ready(name, f"http://127.0.0.1:{http_port}")
        client = await CodingClient.connect(NatsOptions(url=nats.url, user="ocbridge", password="agent-test-pw"))
        try:
            result = await client.run(
                "create probe.sh with content id -u > uid.txt\\nls /data > data.txt 2>&1\\n\nrun sh probe.sh",
                workspace="agent-demo", wait=120,
            )
        finally:
            await client.close()
        assert result.status == TaskStatus.COMPLETED, result.error
        folder = workspaces / "agent-demo"
        assert (folder / "uid.txt").read_text().strip() == "10002"
        assert "Permission denied" in (folder / "data.txt").read_text()
        assert {path.stat().st_uid for path in [folder, *folder.iterdir()]} == {10002}
        _, logs = await podman("logs", name)
        assert "agents run as agent (uid 10002" in logs


async def test_image_is_small_non_root_and_keeps_no_build_configuration(image: str):
    _, size = await podman("image", "inspect", "--format", "{{.Size}}", image)
    assert int(size) < SIZE_BUDGET, f"{image} is {int(size) / 1e6:.0f} MB"

    # What the container holds: the tools, the user, no node/npm, and nothing the build was given
    # as a secret (a CA bundle, pip.conf, .npmrc, apt sources).
    probe = r"""
import glob, json, os, re, shutil, subprocess
def run(*cmd): return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
def certs(text): return set(re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S))
debian = set()
for path in glob.glob("/usr/share/ca-certificates/**/*.crt", recursive=True):
    debian |= certs(open(path).read())
found = [p for p in ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", "/etc/npmrc", os.path.expanduser("~/.npmrc"),
                     os.path.expanduser("~/.config/pip/pip.conf")) if os.path.exists(p)]
print(json.dumps({
    "uid": os.getuid(),
    "opencode": run("opencode", "--version"),
    "tools": {name: bool(shutil.which(name))
              for name in ("git", "rg", "tini", "nats-server", "ocbridge", "node", "npm")},
    "secrets": os.listdir("/run/secrets") if os.path.isdir("/run/secrets") else [],
    "config_files": found,
    "foreign_certs": len(certs(open("/etc/ssl/certs/ca-certificates.crt").read()) - debian),
}))
"""
    _, out = await podman("run", "--rm", "--network=none", "--entrypoint", "python3", image, "-c", probe)
    facts = json.loads(out.strip().splitlines()[-1])
    assert facts["uid"] == IMAGE_UID
    assert facts["opencode"] == "1.18.33"
    assert facts["tools"] == {
        "git": True, "rg": True, "tini": True, "nats-server": True, "ocbridge": True, "node": False, "npm": False,
    }
    assert facts["secrets"] == [] and facts["config_files"] == []
    assert facts["foreign_certs"] == 0, "a CA the build was given is in the image's bundle"

    _, history = await podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
    assert "BEGIN CERTIFICATE" not in history and "index-url" not in history and "registry=" not in history
