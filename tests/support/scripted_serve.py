"""``python scripted_serve.py CONFIG RUNS NAME``: a sidecar whose agent is
:func:`support.faults.recording_engine` (runs appended to RUNS), until SIGTERM. For tests that
SIGKILL a sidecar process without paying for an OpenCode start."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from ocbridge.bridge.config import load_config
from ocbridge.bridge.sidecar import Sidecar
from support.faults import RunLog, recording_engine


def main() -> None:
    config_file, runs, name = sys.argv[1:4]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(Path(config_file), environ={})
    asyncio.run(Sidecar(config, engine=recording_engine(RunLog(Path(runs)), name)).serve_forever())


if __name__ == "__main__":
    main()
