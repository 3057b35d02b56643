"""The fleet heartbeat: each sidecar keeps one entry in the sidecars KV bucket.

The entry (:class:`~ocbridge.client.protocol.SidecarHeartbeat`: id, host, version, engine, slots,
running task ids, last error) is rewritten every ``observability.heartbeat_interval`` seconds. The
bucket's ``max_age`` is the heartbeat TTL, so the entry of a sidecar that died (SIGKILL, lost
machine) expires by itself; a clean stop deletes it. ``ocbridge status`` reads the bucket.

The heartbeat never stops the sidecar: a failed write is logged once per outage and tried again
at the next beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

from nats.js.kv import KeyValue

from ocbridge.client.protocol import SidecarHeartbeat, iso_now, kv_key

__all__ = ["Heartbeat", "HeartbeatSnapshot", "bridge_version"]

log = logging.getLogger(__name__)

#: Longest wait for one KV write (seconds); a beat never blocks the next.
WRITE_TIMEOUT = 5.0
#: Longest wait for the writes of a stop (the "stopping" beat, the delete): a stop while NATS is
#: unreachable must not hang on them.
STOP_TIMEOUT = 2.0


def bridge_version() -> str:
    """The installed opencode-bridge version (``unknown`` from a tree that is not installed)."""
    try:
        return metadata.version("opencode-bridge")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class HeartbeatSnapshot:
    """What changes between beats, read from the worker and the engine at each beat."""

    slots_used: int = 0
    running_tasks: list[str] = field(default_factory=list)
    engine_healthy: bool = True
    #: ``(when, what)`` of the latest problem, already redacted.
    last_error: tuple[str, str] | None = None


class Heartbeat:
    """Writes this sidecar's heartbeat every ``interval`` seconds until :meth:`stop`.

    ``snapshot`` is called at every beat (it must not block); ``ttl`` is the configured heartbeat
    TTL: when the bucket (created earlier, maybe by someone else) keeps entries for another time,
    that real ``max_age`` is reported and a warning says so.
    """

    def __init__(
        self,
        kv: KeyValue,
        *,
        sidecar_id: str,
        engine: str,
        concurrency: int,
        interval: float,
        ttl: float,
        snapshot: Callable[[], HeartbeatSnapshot],
        engine_version: str | None = None,
    ) -> None:
        self._kv = kv
        self._key = kv_key(sidecar_id)
        self._snapshot = snapshot
        self._interval = interval
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self.state: str = "running"
        #: Beats stored, and beats that could not be written.
        self.beats = 0
        self.failures = 0
        self._base = SidecarHeartbeat(
            id=sidecar_id, host=socket.gethostname(), pid=os.getpid(), version=bridge_version(), engine=engine,
            engineVersion=engine_version, concurrency=concurrency, slotsUsed=0, slotsFree=concurrency,
            started=iso_now(), interval=interval, ttl=ttl,
        )

    @property
    def key(self) -> str:
        """The entry's key in the sidecars bucket."""
        return self._key

    async def start(self) -> None:
        """Check the bucket's TTL, write the first beat, then keep beating in the background."""
        await self._check_bucket()
        await self.beat()
        self._task = asyncio.create_task(self._run(), name="ocbridge-heartbeat")

    async def _check_bucket(self) -> None:
        ttl = self._base.ttl
        try:
            max_age = (await asyncio.wait_for(self._kv.status(), WRITE_TIMEOUT)).ttl
        except Exception as exc:  # the beats will report the outage
            log.debug("heartbeat: cannot read the bucket's settings: %r", exc)
            return
        if max_age and abs(max_age - ttl) > 0.5:
            log.warning("heartbeat bucket keeps entries %.0fs, not the configured heartbeat TTL %.0fs: a dead "
                        "sidecar stays in `ocbridge status` for up to %.0fs (`ocbridge init` updates the bucket)",
                        max_age, ttl, max_age)
            self._base.ttl = max_age
        elif not max_age:
            log.warning("heartbeat bucket has no max_age: a sidecar that dies stays listed until deleted "
                        "(`ocbridge init` sets it)")
        if self._interval >= self._base.ttl:
            log.warning("heartbeat interval %.1fs is not below its TTL %.0fs: live sidecars will blink out "
                        "of `ocbridge status`", self._interval, self._base.ttl)

    def _value(self) -> bytes:
        snap = self._snapshot()
        used = max(0, min(snap.slots_used, self._base.concurrency))
        error_at, error = snap.last_error if snap.last_error else (None, None)
        return self._base.model_copy(update={
            "state": self.state, "slots_used": used, "slots_free": self._base.concurrency - used,
            "running_tasks": list(snap.running_tasks), "engine_healthy": snap.engine_healthy,
            "last_error": error, "last_error_at": error_at, "updated": iso_now(),
        }).to_wire()

    async def beat(self, timeout: float = WRITE_TIMEOUT) -> bool:
        """Write the heartbeat now; returns whether it was stored. Never raises."""
        try:
            value = self._value()
            await asyncio.wait_for(self._kv.put(self._key, value), timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._failing:  # once per outage, not every beat
                log.warning("heartbeat: cannot write to KV (%s); this sidecar may drop out of `ocbridge status` "
                            "until it can", exc.__class__.__name__ if not str(exc) else exc)
            self._failing = True
            self.failures += 1
            return False
        if self._failing:
            log.info("heartbeat: writing again")
        self._failing = False
        self.beats += 1
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.beat()

    async def stopping(self) -> None:
        """The sidecar starts a graceful stop: say so at once (it still drains its tasks)."""
        self.state = "stopping"
        await self.beat(STOP_TIMEOUT)

    async def stop(self) -> None:
        """Stop beating and delete the entry (a clean stop leaves the fleet at once)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await asyncio.wait_for(self._kv.delete(self._key), STOP_TIMEOUT)
        except Exception as exc:  # the entry then expires with the bucket's max_age
            log.info("heartbeat: cannot delete its entry (%s); it expires in %.0fs", exc, self._base.ttl)
