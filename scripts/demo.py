"""The offline demo: everything local, nothing from the internet, cleaned up at the end."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from pathlib import Path

from ocbridge.bridge.config import load_config
from ocbridge.bridge.logs import setup_logging
from ocbridge.bridge.redact import default_redactor
from ocbridge.bridge.sidecar import Sidecar
from ocbridge.client.client import CodingClient
from ocbridge.client.render import render_event, render_result

ROOT = Path(__file__).resolve().parents[1]

PROMPT = (
    "create hello.py with content print('Hello from the offline demo')\n"
    "run python3 hello.py\n"
    "read hello.py"
)


async def demo(prompt: str, keep: bool) -> int:
    base = ROOT / ".demo"
    if base.exists() and not keep:
        shutil.rmtree(base)
    config = load_config(
        overrides={
            "workspace_root": str(base / "workspaces"),
            "data_dir": str(base / "data"),
            "offline_model": True,
            "embedded_nats": {"port": 0},
            "log_level": "WARNING",
        },
        environ={},
    )
    setup_logging(default_redactor, config.log_level)
    print("starting embedded NATS, the offline model, OpenCode and the sidecar...", flush=True)
    async with Sidecar(config) as sidecar:
        print(f"sidecar {sidecar.id} ready, NATS at {sidecar.nats_url}\n", flush=True)
        async with await CodingClient.connect(sidecar.nats_url) as client:
            handle = await client.submit(prompt, workspace="demo", session="demo-session", timeout=120)
            print(f"task {handle.task_id} published\n", flush=True)
            async for event in handle.events(timeout=180):
                print(render_event(event, color=sys.stdout.isatty()), flush=True)
            result = await handle.result(timeout=10)
            print()
            print(render_result(result, color=sys.stdout.isatty()))
            workspace = Path(result.workspace.path) if result.workspace and result.workspace.path else None
            if workspace and workspace.is_dir():
                print("\nfiles in the workspace:")
                for path in sorted(p for p in workspace.rglob("*") if p.is_file()):
                    print(f"  {path.relative_to(workspace)}  ({path.stat().st_size} bytes)")
    print("\nshut down cleanly.")
    return 0 if result.ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description="opencode-bridge offline demo")
    parser.add_argument("prompt", nargs="?", default=PROMPT)
    parser.add_argument("--keep", action="store_true", help="keep .demo/ from an earlier run")
    args = parser.parse_args()
    return asyncio.run(demo(args.prompt, args.keep))


if __name__ == "__main__":
    sys.exit(main())
