"""Static checks of the container files, in milliseconds: the image itself is built and run by
``tests/integration/test_image.py`` (podman); these catch a broken file before that slow test."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from ocbridge.bridge.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _runtime_stage(dockerfile: str) -> str:
    """The last stage of the Dockerfile (what the image is made of)."""
    return dockerfile[dockerfile.rindex("\nFROM "):]


def test_dockerfile_copies_existing_sources_and_pins_the_tested_opencode():
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    pinned = re.search(r"ARG OPENCODE_VERSION=(\S+)", dockerfile).group(1)
    setup = (ROOT / "scripts/setup").read_text()
    assert f"OPENCODE_VERSION={pinned}" in setup
    runtime = _runtime_stage(dockerfile)
    assert 'ENTRYPOINT ["tini", "--", "ocbridge-entrypoint"]' in runtime
    assert re.search(r"^USER (?!root|0\b)\S+", runtime, re.MULTILINE), "the image must not run as root"
    assert "HEALTHCHECK" in runtime and "npm" not in runtime.replace("no node/npm", "")
    assert re.search(r"^ARG BASE=\S+bookworm", dockerfile, re.MULTILINE), "the base is a pinned build argument"


def test_compose_runs_jetstream_nats_with_auth_on_loopback_and_a_valid_sidecar_config():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    nats, sidecar, client = (compose["services"][name] for name in ("nats", "sidecar", "client"))
    conf = (ROOT / "docker/nats.conf").read_text()
    assert "jetstream" in conf and "authorization" in conf and "$NATS_PASSWORD" in conf
    # Published ports: loopback only.
    for service in (nats, sidecar):
        assert all(str(port).startswith("127.0.0.1:") for port in service.get("ports", []))
    # No password has a default: ${NATS_PASSWORD:?...} refuses to start without the env file.
    assert all(":?" in str(v) for k, v in nats["environment"].items())

    def resolved(environment: dict) -> dict[str, str]:
        return {k: re.sub(r"\$\{([A-Z_]+):[-?]([^}]*)\}", lambda m: "secret" if "PASSWORD" in m.group(1) or
                          "USER" in m.group(1) else m.group(2), str(v)) for k, v in environment.items()}

    env = resolved(sidecar["environment"])
    config = load_config(environ={k: v for k, v in env.items() if v and k.startswith("OCBRIDGE_")})
    assert config.nats.url == "nats://nats:4222" and config.nats.password is not None
    assert config.concurrency == 2 and config.shutdown_grace == 60
    assert config.observability.http_port == 8080
    # Graceful stop needs more time from the engine than the sidecar's own grace period.
    assert int(sidecar["stop_grace_period"].rstrip("s")) > config.shutdown_grace
    assert resolved(client["environment"])["OCBRIDGE_NATS_PASSWORD"] == "secret"
