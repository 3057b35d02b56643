"""``ocbridge serve``: build the configuration from flags, environment and file, then run."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from .config import ConfigError, load_config
from .logs import setup_logging
from .processes import forbid_inspection
from .redact import default_redactor
from .sidecar import Sidecar

log = logging.getLogger(__name__)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "workspace_root": args.workspace_root,
        "concurrency": args.concurrency,
        "offline_model": args.offline_model,
        "data_dir": args.data_dir,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }
    if args.http_port is not None:
        overrides["observability"] = {"http_port": args.http_port}
    if args.nats_url:
        overrides["nats"] = {"url": args.nats_url}
    if args.opencode_url:
        overrides["opencode"] = {"url": args.opencode_url}
    return overrides


def serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"ocbridge serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(default_redactor, config.log_level, config.log_format)
    if not forbid_inspection():
        log.warning("could not make the sidecar non-dumpable: same-user processes may read its environment")
    try:
        asyncio.run(Sidecar(config).serve_forever())
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        print(f"ocbridge serve: {default_redactor.text(str(exc))}", file=sys.stderr)
        return 1
    return 0
