"""The one seam where the client reaches into the sidecar package.

Only what really runs the sidecar in this process comes through here: ``ocbridge serve``,
``ocbridge offline-model``, the operator commands that reuse the sidecar's configuration and
set-up code (``ocbridge init``, ``ocbridge doctor``) and the in-process backends (``opencode``,
``opencode-cli``, ``claudecode``). Nothing else in the client imports :mod:`ocbridge.bridge`, so the client alone
needs only nats-py and pydantic; the imports below are lazy and fail with the install hint.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

from .protocol import OcbridgeError

if TYPE_CHECKING:
    from .station.backends.base import CodingBackend
    from .station.config import StationCodingConfig

INSTALL_HINT = "pip install 'opencode-bridge[bridge]'"


class SidecarUnavailable(OcbridgeError, ImportError):
    """The sidecar's extras are not installed; the message says how to install them."""


def _load(module: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SidecarUnavailable(f"{purpose} needs the sidecar extras: {INSTALL_HINT} ({exc})") from None


def serve(args: argparse.Namespace) -> int:
    """``ocbridge serve``: run the sidecar in this process until SIGTERM/SIGINT."""
    return _load("ocbridge.bridge.cli", "ocbridge serve").serve(args)


def init(args: argparse.Namespace) -> int:
    """``ocbridge init``: create or check the JetStream objects with the sidecar's own code and config."""
    return _load("ocbridge.bridge.admin.init", "ocbridge init").main(args)


def doctor(args: argparse.Namespace) -> int:
    """``ocbridge doctor``: check what a sidecar needs, one line per check."""
    return _load("ocbridge.bridge.admin.doctor", "ocbridge doctor").main(args)


def offline_model(argv: Sequence[str]) -> int:
    """``ocbridge offline-model``: the offline scripted model server."""
    return _load("ocbridge.bridge.offline_model.server", "ocbridge offline-model").main(list(argv))


def in_process_backend(config: StationCodingConfig) -> CodingBackend:
    """The in-process backend ``config.backend`` names (the sidecar's pipeline run locally)."""
    module = _load("ocbridge.bridge.inprocess.backends", f"the {config.backend} backend")
    return module.LocalBackend.from_station(config)
