"""Process helpers shared by everything that starts a child process."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import signal
import sys
from collections.abc import Iterable, Mapping

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


#: Variables an agent process inherits from the bridge; everything else (git tokens, NATS
#: credentials, the bridge's own settings) is left out unless a setting puts it there.
INHERITED_ENV: tuple[str, ...] = (
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
)  # fmt: skip

#: Model-provider credentials OpenCode reads from its environment (it needs them to call the model).
PROVIDER_ENV = re.compile(
    r"^(?:[A-Z0-9_]+_API_KEY|(?:AWS|AZURE|GOOGLE|VERTEX|OPENAI|ANTHROPIC|OPENROUTER)_[A-Z0-9_]+)$"
)


def inherited_environment(
    names: Iterable[str] = INHERITED_ENV, *, pattern: re.Pattern[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The allow-listed part of the environment (plus names matching ``pattern``)."""
    environ = os.environ if environ is None else environ
    allowed = set(names)
    return {k: v for k, v in environ.items() if k in allowed or (pattern is not None and pattern.match(k))}
