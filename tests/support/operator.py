"""Running the ``ocbridge`` operator commands (``status``, ``init``, ``doctor``) as an operator
would, from tests whose event loop keeps an in-process sidecar running."""

from __future__ import annotations

import asyncio
import os

from ocbridge.client.protocol import Naming

from .stack import OCBRIDGE


def naming_env(naming: Naming) -> dict[str, str]:
    """``OCBRIDGE_NAMING__*`` variables: how an operator points the commands at non-default names."""
    return {f"OCBRIDGE_NAMING__{k.upper()}": str(v) for k, v in naming.model_dump(exclude_none=True).items()}


async def ocbridge(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """Run the real ``ocbridge`` command without blocking the loop; ``(exit code, stdout, stderr)``.

    The test process's own ``OCBRIDGE_*`` variables are left out; ``env`` adds to the rest."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OCBRIDGE_")}
    proc = await asyncio.create_subprocess_exec(
        OCBRIDGE, *args, env={**base, **(env or {})}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(), err.decode()
