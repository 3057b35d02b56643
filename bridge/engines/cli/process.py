"""One agent CLI run as a child process: JSON lines out, bounded stderr, and a tree kill that sticks.

Agent CLIs start tools that outlive them: Claude Code's and OpenCode's bash tools run commands in
their *own* session, so killing the CLI's process group misses them and a SIGTERM of the CLI leaves
them running. :meth:`CLIProcess.kill_tree` therefore collects the whole tree from ``/proc`` *before*
signalling anything (once the CLI is dead its orphans are re-parented and the ppid links are lost):
descendants by parent pid, every process in a session led by one of them, and every process that
inherited our per-run marker environment variable (which even a double-forked daemon keeps).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from ocbridge.bridge.engines.base import EngineError

log = logging.getLogger(__name__)

#: Environment variable holding a per-run random marker, inherited by every process of the tree.
MARKER_VAR = "OCBRIDGE_CLI_RUN"
_PR_SET_PDEATHSIG = 1
_CHUNK = 256 * 1024

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not glibc/musl
    _libc = None


def _die_with_parent(parent: int) -> None:
    """``preexec_fn``: SIGKILL this child when its parent dies (even by SIGKILL).

    Only async-signal-safe work here (we are between fork and exec). PDEATHSIG fires when the
    *thread* that forked dies, which is the event loop thread: the loop lives as long as the bridge.
    """
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


# ------------------------------------------------------------------------------------ /proc


def _stat(pid: int) -> tuple[int, int, str, int] | None:
    """``(ppid, sid, state, starttime)`` of a process, or ``None`` when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    return int(fields[1]), int(fields[3]), fields[0], int(fields[19])


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or not ours to read
        return False


def collect_tree(root: int, marker: str | None = None, root_start: int | None = None) -> dict[int, int]:
    """Every live process belonging to ``root``'s tree, as ``{pid: starttime}`` (``root`` included).

    Members: descendants by parent pid, members of any session led by a member, and (with
    ``marker``) any process whose environment holds ``MARKER_VAR=marker``. With ``root_start``, a
    ``root`` pid whose start time differs (reused by another process) contributes nothing.
    """
    table: dict[int, tuple[int, int, str, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _stat(int(entry))) is not None:
            table[int(entry)] = info
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    members: set[int] = set()
    same_root = root in table and (root_start is None or table[root][3] == root_start)
    todo = [root] if same_root else []
    while todo:
        pid = todo.pop()
        if pid not in members:
            members.add(pid)
            todo.extend(children.get(pid, ()))
    leaders = {pid for pid in members if table[pid][1] == pid}
    members |= {pid for pid, info in table.items() if info[1] in leaders}
    if marker is not None:
        wanted = f"{MARKER_VAR}={marker}".encode()
        members |= {pid for pid in table if pid not in members and _has_marker(pid, wanted)}
    # Zombies are already dead: only their parent (or init) can reap them.
    return {pid: table[pid][3] for pid in members if table[pid][2] != "Z"}


def _alive(pid: int, starttime: int) -> bool:
    info = _stat(pid)
    return info is not None and info[3] == starttime and info[2] != "Z"


def _signal_all(procs: Mapping[int, int], sig: signal.Signals) -> None:
    for pid, starttime in procs.items():
        # The start time guards against a pid reused since the tree was collected.
        if _alive(pid, starttime):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


async def _wait_dead(procs: Mapping[int, int], timeout: float) -> bool:
    """Wait until none of ``procs`` is alive (zombies count as dead); ``False`` on timeout."""
    deadline = time.monotonic() + timeout
    # Polling /proc: most of the tree are not our children, there is nothing to wait on.
    while any(_alive(pid, start) for pid, start in procs.items()):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    info = _stat(pid)
    return info is not None and info[2] != "Z"


# ---------------------------------------------------------------------------------- process


class CLIProcess:
    """A CLI started in its own session with piped stdin/stdout/stderr.

    Use as ``async with CLIProcess(...) as proc: async for line in proc.lines(): ...``: leaving the
    block by any path (including cancellation) kills and reaps the whole tree if still running.
    ``stdin_data`` is written then stdin closed (prompts go there: no argv size limit, and a prompt
    starting with ``-`` is never an option).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: Path | str,
        env: Mapping[str, str],
        stdin_data: bytes | None = None,
        stderr_limit: int = 64 * 1024,
        kill_grace: float = 2.0,
    ) -> None:
        self.argv = list(argv)
        self.cwd = str(cwd)
        self.marker = secrets.token_hex(8)
        self.env = {**env, MARKER_VAR: self.marker}
        self.stdin_data = stdin_data
        self.kill_grace = kill_grace
        self.killed = False
        self._stderr = bytearray()
        self._stderr_limit = stderr_limit
        self._proc: asyncio.subprocess.Process | None = None
        self._start_time: int | None = None  # /proc start time of the CLI: detects a reused pid
        self._tasks: list[asyncio.Task[None]] = []
        self._kill_lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        """The CLI's pid once started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The CLI's exit code once reaped (negative: killed by that signal)."""
        return self._proc.returncode if self._proc is not None else None

    async def start(self) -> None:
        """Spawn the process; raises :class:`EngineError` when the binary cannot be executed."""
        parent = os.getpid()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=asyncio.subprocess.PIPE if self.stdin_data is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                preexec_fn=functools.partial(_die_with_parent, parent),
            )
        except OSError as exc:
            raise EngineError(f"cannot start {self.argv[0]} in {self.cwd}: {exc}") from exc
        if (info := _stat(self._proc.pid)) is not None:
            self._start_time = info[3]
        self._tasks.append(asyncio.create_task(self._drain_stderr(), name=f"stderr-{self._proc.pid}"))
        if self.stdin_data is not None:
            self._tasks.append(asyncio.create_task(self._feed_stdin(self.stdin_data), name=f"stdin-{self._proc.pid}"))

    async def __aenter__(self) -> CLIProcess:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Shielded: a cancelled run must still finish killing its tree before the cancel propagates.
        await asyncio.shield(self.close())

    async def close(self) -> None:
        """Kill the tree if the process still runs, then reap it and stop the helper tasks."""
        if self._proc is not None and self._proc.returncode is None:
            await self.kill_tree()
        else:
            # The CLI exited by itself, but tools it started in their own session may not have.
            await self._sweep()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task

    async def lines(self) -> AsyncIterator[bytes]:
        """stdout split on newlines, with no length limit (Claude Code lines exceed 64 KiB)."""
        assert self._proc is not None and self._proc.stdout is not None
        stdout, buffer = self._proc.stdout, bytearray()
        while chunk := await stdout.read(_CHUNK):
            buffer += chunk
            start = 0
            while (end := buffer.find(b"\n", start)) >= 0:
                yield bytes(buffer[start:end])
                start = end + 1
            del buffer[:start]
        if buffer.strip():
            yield bytes(buffer)

    async def wait(self, timeout: float) -> int:
        """Wait for the process to exit; on timeout kill the tree. Returns the exit code."""
        assert self._proc is not None
        try:
            return await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            log.warning("%s (pid %s) did not exit within %.1fs; killing it", self.argv[0], self.pid, timeout)
            await self.kill_tree()
            return self._proc.returncode if self._proc.returncode is not None else -int(signal.SIGKILL)

    @property
    def stderr_text(self) -> str:
        """The last ``stderr_limit`` bytes of stderr."""
        return bytes(self._stderr[-self._stderr_limit :]).decode("utf-8", errors="replace")

    async def stderr_done(self, timeout: float = 2.0) -> str:
        """Wait (bounded) until stderr is closed, then return :attr:`stderr_text`."""
        if self._tasks:
            await asyncio.wait({self._tasks[0]}, timeout=timeout)
        return self.stderr_text

    async def kill_tree(self) -> None:
        """SIGTERM the whole tree, SIGKILL what is left after ``kill_grace``, reap the CLI.

        Safe to call concurrently and repeatedly; returns within about ``kill_grace + 5`` seconds.
        """
        if self._proc is None:
            return
        async with self._kill_lock:
            self.killed = True
            proc = self._proc
            tree = collect_tree(proc.pid, self.marker, self._start_time)
            if tree:
                log.info("killing %s process tree of pid %s: %s", self.argv[0], proc.pid, sorted(tree))
            _signal_all(tree, signal.SIGTERM)
            await _wait_dead(tree, self.kill_grace)
            # Anything forked during the grace period joins the tree through its ppid or the marker.
            survivors = {p: t for p, t in tree.items() if _alive(p, t)}
            if proc.returncode is None:
                survivors |= collect_tree(proc.pid, self.marker, self._start_time)
            survivors |= self._marked()
            if survivors:
                log.warning("SIGKILL for %s after %.1fs: %s", self.argv[0], self.kill_grace, sorted(survivors))
                _signal_all(survivors, signal.SIGKILL)
                # SIGKILL is delivered asynchronously: return only once the tree is really dead.
                await _wait_dead(survivors, 2.0)
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                log.error("%s (pid %s) survived SIGKILL", self.argv[0], proc.pid)
            # A tool process that inherited stdout would keep the pipe open: end the read loop anyway.
            if proc.stdout is not None:
                proc.stdout.feed_eof()

    async def _sweep(self) -> None:
        """Kill leftovers of a CLI that already exited (processes still carrying our marker)."""
        leftovers = self._marked()
        if leftovers:
            log.info("%s left %d process(es) behind; killing them", self.argv[0], len(leftovers))
            _signal_all(leftovers, signal.SIGKILL)
            await _wait_dead(leftovers, 2.0)

    def _marked(self) -> dict[int, int]:
        wanted = f"{MARKER_VAR}={self.marker}".encode()
        found: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            info = _stat(int(entry)) if entry.isdigit() and _has_marker(int(entry), wanted) else None
            if info is not None and info[2] != "Z":
                found[int(entry)] = info[3]
        return found

    async def _drain_stderr(self) -> None:
        """Keep reading stderr (a full pipe would block the CLI), keeping only the tail."""
        assert self._proc is not None and self._proc.stderr is not None
        while chunk := await self._proc.stderr.read(_CHUNK):
            self._stderr += chunk
            if len(self._stderr) > 2 * self._stderr_limit:  # trim in batches, not per chunk
                del self._stderr[: -self._stderr_limit]

    async def _feed_stdin(self, data: bytes) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        stdin = self._proc.stdin
        try:
            stdin.write(data)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            log.debug("%s closed stdin before reading all of it", self.argv[0])
        finally:
            stdin.close()


async def run_capture(
    argv: Sequence[str], *, cwd: Path | str, env: Mapping[str, str], timeout: float = 30.0
) -> tuple[int, str, str]:
    """Run a short command to completion: ``(exit code, stdout, stderr tail)``; the tree is killed
    on timeout (exit code then negative) or cancellation."""
    async with CLIProcess(argv, cwd=cwd, env=env) as proc:
        chunks: list[bytes] = []

        async def read_all() -> None:
            async for line in proc.lines():
                chunks.append(line)

        try:
            await asyncio.wait_for(read_all(), timeout)
        except TimeoutError:
            await proc.kill_tree()
            return -int(signal.SIGKILL), b"\n".join(chunks).decode(errors="replace"), proc.stderr_text
        code = await proc.wait(5.0)
        return code, b"\n".join(chunks).decode(errors="replace"), await proc.stderr_done()
