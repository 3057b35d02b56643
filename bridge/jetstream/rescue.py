"""A dead neighbour's deliveries, given back at once instead of after ``ack_wait``.

A sidecar that dies (SIGKILL, the OOM killer, a crash) leaves its deliveries unacknowledged, and
JetStream redelivers them only after the consumer's ``ack_wait`` (30 s by default). A sidecar on the
same host (the one systemd restarted, or a neighbour) can prove that the holder's process is gone
(:mod:`..storage.liveness`). Each task lease names its message's ack subject, so such a sidecar
sends ``-NAK`` there and JetStream redelivers the message now; the copy that arrives takes over
the dead holder's task lease at once. Elsewhere nothing is provable and ``ack_wait`` rules.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NATS

from ocbridge.bridge.storage.leases import abandoned
from ocbridge.bridge.storage.stores import KeyValueStore
from ocbridge.client.protocol.subjects import is_concrete_subject

__all__ = ["Rescuer", "sweep_interval"]

log = logging.getLogger(__name__)

#: Where JetStream's ack subjects live; a lease naming anything else is not acted on.
ACK_PREFIX = "$JS.ACK."


def sweep_interval(ack_wait: float) -> float:
    """How often the leases are looked through: well within ``ack_wait``, at most every second."""
    return min(max(ack_wait / 4, 1.0), 10.0)


class Rescuer:
    """Looks through the task leases in ``leases`` (keys starting with ``prefix``) every
    ``interval`` seconds and gives back the deliveries of holders provably gone."""

    def __init__(self, nc: NATS, leases: KeyValueStore, *, prefix: str, interval: float) -> None:
        self._nc = nc
        self._leases = leases
        self._prefix = prefix
        self.interval = interval
        #: ``(key, revision)`` of the leases already given back (a lease nobody refreshes keeps its
        #: revision until it is taken over or expires): one ``-NAK`` each.
        self._sent: set[tuple[str, int]] = set()

    async def run_forever(self) -> None:
        """Sweep every ``interval`` until cancelled."""
        failing = False
        current = asyncio.current_task()
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
                failing = False
            except Exception as exc:  # NATS restarting: the next sweep tries again
                if not failing:
                    log.info("looking for deliveries of dead sidecars failed (%s: %s); trying again",
                             type(exc).__name__, exc)
                failing = True
            if current is not None and current.cancelling():
                # A cancel that landed inside a NATS call and was swallowed there still stops the
                # loop (otherwise the sidecar's stop waits for it for ever).
                raise asyncio.CancelledError

    async def sweep(self) -> int:
        """Give back the deliveries whose holders are provably gone; returns how many."""
        keys = [key for key in await self._leases.keys() if key.startswith(self._prefix)]
        sent = 0
        for key in keys:
            entry = await self._leases.entry(key)
            if entry is None or (key, entry[1]) in self._sent:
                continue
            lease = abandoned(entry[0])
            ack = lease.get("ack") if lease is not None else None
            # Only a single concrete JetStream ack subject: never a wildcard, nor whitespace that
            # would split the protocol line.
            if not isinstance(ack, str) or not ack.startswith(ACK_PREFIX) or not is_concrete_subject(ack):
                continue
            await self._nc.publish(ack, b"-NAK")
            self._sent.add((key, entry[1]))
            sent += 1
            log.warning("%s: its sidecar %s is no longer running; given back for redelivery now",
                        lease.get("owner"), lease.get("holder"))
        current = set(keys)
        self._sent = {(key, revision) for key, revision in self._sent if key in current}
        return sent
