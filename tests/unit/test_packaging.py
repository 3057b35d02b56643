"""Static checks of the container files. No Docker engine runs here, so the image is never built
in these tests: they check what can be checked without one (named as such: a stand-in, not a build)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from ocbridge.bridge.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_copies_existing_sources_and_pins_the_tested_opencode():
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    pinned = re.search(r"ARG OPENCODE_VERSION=(\S+)", dockerfile).group(1)
    setup = (ROOT / "scripts/setup").read_text()
    assert f"OPENCODE_VERSION={pinned}" in setup
    assert 'ENTRYPOINT ["tini", "--", "ocbridge", "serve"]' in dockerfile


def test_compose_wires_the_sidecar_to_jetstream_nats_with_a_valid_config():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    nats, sidecar = compose["services"]["nats"], compose["services"]["sidecar"]
    assert "--jetstream" in nats["command"]
    assert (ROOT / sidecar["build"]["context"] / sidecar["build"]["dockerfile"]).is_file()
    env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in sidecar["environment"].items()}
    assert env["OCBRIDGE_NATS_URL"] == "nats://nats:4222"
    config = load_config(environ={k: v for k, v in env.items() if v})
    assert config.nats.url == "nats://nats:4222" and config.concurrency == 2 and config.shutdown_grace == 60
    # Graceful stop needs more time from Docker than the sidecar's own grace period.
    assert int(sidecar["stop_grace_period"].rstrip("s")) > config.shutdown_grace
