"""Shared fixtures: a real nats-server with JetStream and a sidecar + client stack.

Helpers that tests import (unique names, configs, a sidecar process, the git server) live in
``tests/support``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ocbridge.bridge.jetstream.natsd import EmbeddedNats
from ocbridge.bridge.sidecar import Sidecar
from ocbridge.client.client import CodingClient
from support.stack import sidecar_config, unique_naming


@pytest.fixture(scope="session")
async def nats_server(tmp_path_factory) -> AsyncIterator[EmbeddedNats]:
    """One real nats-server with JetStream for the whole run (tests isolate by subject/bucket names)."""
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"), port=0)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def stack(nats_server, tmp_path_factory) -> AsyncIterator[tuple[Sidecar, CodingClient]]:
    """A sidecar (real OpenCode + offline model) and a client, shared by one test module."""
    tmp = tmp_path_factory.mktemp("stack")
    naming = unique_naming()
    sidecar = Sidecar(sidecar_config(nats_server.url, tmp, naming))
    await sidecar.start()
    client = await CodingClient.connect(nats_server.url, naming=naming)
    yield sidecar, client
    await client.close()
    await sidecar.stop(grace=5)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under ``tests/integration`` is marked ``integration`` (``-m "not integration"``
    runs the fast unit tests alone)."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
