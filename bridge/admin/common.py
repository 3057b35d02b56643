"""What ``ocbridge init`` and ``ocbridge doctor`` share: the sidecar's configuration read the way
``serve`` reads it, a connection that gives up, and a report printed one redacted line at a time."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable
from typing import IO, Any, TypeVar

from nats.aio.client import Client as NATS

from ocbridge.bridge.config import BridgeConfig, ConfigError, load_config
from ocbridge.bridge.logs import setup_logging
from ocbridge.bridge.redact import Redactor, default_redactor
from ocbridge.client.connection import connect

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "Report", "admin_config", "admin_connect", "config_secrets", "within"]

#: A check failed, or an object does not match the configuration and cannot be made to.
EXIT_FAILED = 1
#: The command could not run at all: invalid configuration, NATS unreachable.
EXIT_USAGE = 2

T = TypeVar("T")


def admin_config(args: argparse.Namespace, command: str) -> BridgeConfig | None:
    """The configuration ``serve`` would use (defaults < ``--config`` file < ``OCBRIDGE_*`` < flags),
    or ``None`` after printing what is wrong with it. Its secrets are registered with the redactor
    and logs go to stderr, redacted, warnings only."""
    overrides: dict[str, Any] = {
        "workspace_root": getattr(args, "workspace_root", None),
        "data_dir": getattr(args, "data_dir", None),
    }
    if getattr(args, "nats_url", None):
        overrides["nats"] = {"url": args.nats_url}
    try:
        config = load_config(getattr(args, "config", None), overrides=overrides)
    except ConfigError as exc:
        print(f"ocbridge {command}: {exc}", file=sys.stderr)
        return None
    for secret in config_secrets(config):
        default_redactor.add(secret)
    setup_logging(default_redactor, "WARNING", "text")
    return config


def config_secrets(config: BridgeConfig) -> list[str]:
    """Every credential value the configuration holds (to be masked wherever it could show)."""
    values = [s.get_secret_value() for s in (config.nats.password, config.nats.token, config.opencode.password,
                                            config.git.token) if s is not None]
    values += [v for k, v in config.claudecode.env.items()
               if any(word in k.upper() for word in ("KEY", "TOKEN", "SECRET", "PASSWORD"))]
    if token := config.git.default_token():
        values.append(token)
    return values


async def within(what: Awaitable[T], timeout: float) -> T:
    """``what``, or :class:`TimeoutError` after ``timeout`` seconds."""
    return await asyncio.wait_for(what, timeout)


async def admin_connect(config: BridgeConfig, timeout: float) -> NATS:
    """Connect to the configured NATS, giving up after ``timeout`` seconds (``ConnectionError``)."""
    return await connect(config.nats.model_copy(update={"name": "ocbridge-admin"}), retry_for=timeout,
                         allow_reconnect=False)


class Report:
    """Prints ``<word>  <what>  <detail>`` lines, redacted; remembers whether any failed."""

    #: Words that make the command exit non-zero.
    FAILING = frozenset({"FAIL"})

    def __init__(self, redactor: Redactor = default_redactor, out: IO[str] | None = None, width: int = 28) -> None:
        self._redactor = redactor
        self._out = out
        self._width = width
        self.lines: list[tuple[str, str, str]] = []

    def line(self, word: str, what: str, detail: str = "") -> None:
        what, detail = self._redactor.text(what), self._redactor.text(detail)
        self.lines.append((word, what, detail))
        text = f"{word:<8} {what:<{self._width}} {detail}".rstrip()
        print(text, file=self._out or sys.stdout, flush=True)

    @property
    def failed(self) -> bool:
        return any(word in self.FAILING for word, _, _ in self.lines)
