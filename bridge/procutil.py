"""Process helpers shared by everything that starts a child process."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: have the kernel SIGKILL the child when its parent dies, even by SIGKILL.

    Without it, a sidecar killed with ``kill -9`` would leave its ``opencode serve`` (or an agent
    CLI) running with nobody to reap it. Linux only; a no-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
