"""One agent CLI run as a child process: JSON lines out, bounded stderr, and a tree kill that sticks.

Agent CLIs start tools that outlive them: Claude Code's and OpenCode's bash tools run commands in
their *own* session, so killing the CLI's process group misses them and a SIGTERM of the CLI leaves
them running. :meth:`CLIProcess.kill_tree` therefore collects the whole tree (see
:func:`ocbridge.bridge.processes.collect_tree`) *before* signalling anything (once the CLI is dead its
orphans are re-parented and the ppid links are lost): descendants by parent pid, every process in a
session led by one of them, and every process that inherited our per-run marker environment variable
(which even a double-forked daemon keeps). A pid reused since is never signalled (create times are
compared), and zombies count as dead.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from ocbridge.bridge.engines.base import EngineError
from ocbridge.bridge.processes import (
    EnvMarker,
    collect_tree,
    die_with_parent_hook,
    is_alive,
    process_of,
    signal_all,
    wait_dead,
)

log = logging.getLogger(__name__)

#: Environment variable holding a per-run random marker, inherited by every process of the tree.
MARKER_VAR = "OCBRIDGE_CLI_RUN"
_CHUNK = 256 * 1024
#: Longest stdout line kept (Claude Code lines carry whole file contents and exceed 64 KiB); a
#: longer one is dropped with a warning instead of growing memory without bound.
MAX_LINE = 32 * 1024 * 1024


async def _finish_shielded(work: Awaitable[None]) -> None:
    """Await ``work`` to its end even when the caller is cancelled meanwhile, then re-raise the
    cancellation. A single ``await shield(work)`` survives only the *first* cancel: a second one
    returns at once while ``work`` goes on unobserved."""
    task = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            if task.cancelled():  # the work itself was cancelled (loop shutdown), not only us
                raise
            cancelled = exc
    if cancelled is None:
        task.result()  # the work's own error, if any
        return
    if (error := task.exception()) is not None:
        log.error("cleanup failed while cancelled: %s", error, exc_info=error)
    raise cancelled


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
        max_line: int = MAX_LINE,
        spawn: Mapping[str, Any] | None = None,
    ) -> None:
        """``spawn``: extra ``create_subprocess_exec`` options (the user to run as)."""
        self.argv = list(argv)
        self._spawn = dict(spawn or {})
        self.max_line = max_line
        self.dropped_lines = 0
        self.cwd = str(cwd)
        self.marker = EnvMarker(MARKER_VAR)
        self.env = {**env, MARKER_VAR: self.marker.value}
        self.stdin_data = stdin_data
        self.kill_grace = kill_grace
        self.killed = False
        self._stderr = bytearray()
        self._stderr_limit = stderr_limit
        self._proc: asyncio.subprocess.Process | None = None
        self._root: psutil.Process | None = None  # the CLI, identified by pid and create time
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
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=asyncio.subprocess.PIPE if self.stdin_data is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                preexec_fn=die_with_parent_hook(),
                **self._spawn,
            )
        except OSError as exc:
            raise EngineError(f"cannot start {self.argv[0]} in {self.cwd}: {exc}") from exc
        self._root = process_of(self._proc.pid)
        self._tasks.append(asyncio.create_task(self._drain_stderr(), name=f"stderr-{self._proc.pid}"))
        if self.stdin_data is not None:
            self._tasks.append(asyncio.create_task(self._feed_stdin(self.stdin_data), name=f"stdin-{self._proc.pid}"))

    async def __aenter__(self) -> CLIProcess:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # A cancelled run must still finish killing its tree before the cancellation propagates,
        # however many times it is cancelled meanwhile.
        await _finish_shielded(self.close())

    async def close(self) -> None:
        """Kill the tree if the process still runs, then reap it and stop the helper tasks."""
        if self._proc is not None and self._proc.returncode is None:
            await self.kill_tree()
        else:
            # The CLI exited by itself, but tools it started in their own session may not have.
            await self._sweep()
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for task, result in zip(self._tasks, results, strict=True):
            if isinstance(result, Exception):  # cancelled helpers are what was asked for
                log.warning("%s: %s failed: %s: %s", self.argv[0], task.get_name(), type(result).__name__, result)

    async def lines(self) -> AsyncIterator[bytes]:
        """stdout split on newlines. Lines may be long (Claude Code's exceed 64 KiB), but one over
        ``max_line`` bytes is dropped with a warning (counted in :attr:`dropped_lines`)."""
        assert self._proc is not None and self._proc.stdout is not None
        stdout, buffer = self._proc.stdout, bytearray()
        skipped = 0  # bytes of an oversized line dropped so far (its end is still to come)
        while chunk := await stdout.read(_CHUNK):
            buffer += chunk
            start = 0
            while (end := buffer.find(b"\n", start)) >= 0:
                if skipped:
                    self._dropped_line(skipped + end - start)
                    skipped = 0
                else:
                    yield bytes(buffer[start:end])
                start = end + 1
            del buffer[:start]
            if len(buffer) > self.max_line:
                skipped += len(buffer)
                buffer.clear()
        if skipped:
            self._dropped_line(skipped + len(buffer))
        elif buffer.strip():
            yield bytes(buffer)

    def _dropped_line(self, size: int) -> None:
        self.dropped_lines += 1
        log.warning("%s (pid %s) printed a line of %d bytes, over the limit of %d: dropped it",
                    self.argv[0], self.pid, size, self.max_line)  # fmt: skip

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
            # Scans of every process run in a thread: on a busy host they would stall the event loop.
            tree = await asyncio.to_thread(collect_tree, self._root, self.marker)
            if tree:
                log.info("killing %s process tree of pid %s: %s", self.argv[0], proc.pid, _pids(tree))
            signal_all(tree, signal.SIGTERM)
            await wait_dead(tree, self.kill_grace)
            # Anything forked during the grace period joins the tree through its ppid or the marker.
            survivors = {p for p in tree if is_alive(p)}
            survivors |= await asyncio.to_thread(collect_tree, self._root, self.marker)
            if survivors:
                log.warning("SIGKILL for %s after %.1fs: %s", self.argv[0], self.kill_grace, _pids(survivors))
                signal_all(survivors, signal.SIGKILL)
                # SIGKILL is delivered asynchronously: return only once the tree is really dead.
                await wait_dead(survivors, 2.0)
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                log.error("%s (pid %s) survived SIGKILL", self.argv[0], proc.pid)
            # A tool process that inherited stdout would keep the pipe open: end the read loop anyway.
            if proc.stdout is not None:
                proc.stdout.feed_eof()

    async def _sweep(self) -> None:
        """Kill leftovers of a CLI that already exited (processes still carrying our marker)."""
        leftovers = await asyncio.to_thread(collect_tree, None, self.marker)
        if leftovers:
            log.info("%s left %d process(es) behind; killing them", self.argv[0], len(leftovers))
            signal_all(leftovers, signal.SIGKILL)
            await wait_dead(leftovers, 2.0)

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


def _pids(procs: Iterable[psutil.Process]) -> list[int]:
    return sorted(proc.pid for proc in procs)


async def run_capture(
    argv: Sequence[str], *, cwd: Path | str, env: Mapping[str, str], timeout: float = 30.0,
    spawn: Mapping[str, Any] | None = None,
) -> tuple[int, str, str]:
    """Run a short command to completion: ``(exit code, stdout, stderr tail)``; the tree is killed
    on timeout (exit code then negative) or cancellation."""
    async with CLIProcess(argv, cwd=cwd, env=env, spawn=spawn) as proc:
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
