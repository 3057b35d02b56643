"""Whether the process that wrote a lease is provably gone, so that its lease need not be waited out.

A lease names its holder's process: the kernel's boot id, the pid namespace, the pid and the pid's
start time (``/proc/<pid>/stat``). Another process that shares the boot id and the pid namespace
can check that pid itself: if it no longer runs (or is a zombie, or the pid now belongs to a
younger process), the holder died and its lease may be taken over at once instead of after its
TTL (a sidecar restarted by systemd on the same box, two sidecars on one host). Anywhere else,
nothing is provable and the TTL rules.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

__all__ = ["process_identity", "provably_dead"]

_PROC = Path("/proc")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _stat_fields(pid: int) -> tuple[str, str] | None:
    """``(state, start time in clock ticks since boot)`` of ``pid``, or ``None`` when it is gone."""
    text = _read(_PROC / str(pid) / "stat")
    if text is None:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
    fields = text[text.rfind(")") + 2:].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _pid_namespace() -> str | None:
    try:
        return os.readlink(_PROC / "self" / "ns" / "pid")
    except OSError:
        return None


@functools.cache
def process_identity() -> dict[str, Any]:
    """This process, as other processes on the same host can check it (empty off Linux)."""
    boot = _read(_PROC / "sys" / "kernel" / "random" / "boot_id")
    namespace = _pid_namespace()
    fields = _stat_fields(os.getpid())
    if boot is None or namespace is None or fields is None:
        return {}
    return {"boot": boot, "pidns": namespace, "pid": os.getpid(), "start": fields[1]}


def provably_dead(identity: Any) -> bool:
    """Whether the process ``identity`` (from :func:`process_identity`) is known not to run any more.

    ``False`` whenever it cannot be known: another host or pid namespace, a malformed identity.
    """
    mine = process_identity()
    if not mine or not isinstance(identity, dict):
        return False
    if identity.get("boot") != mine["boot"] or identity.get("pidns") != mine["pidns"]:
        return False
    pid, start = identity.get("pid"), identity.get("start")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not isinstance(start, str):
        return False
    fields = _stat_fields(pid)
    if fields is None:
        return True
    state, started = fields
    return started != start or state in ("Z", "X", "x")
