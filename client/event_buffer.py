"""The events of one task waiting to be read: ordered by ``(attempt, seq)``, de-duplicated, bounded.

:class:`EventBuffer` applies the ordering and buffering rules that :mod:`.handle` documents for
consumers: an event at or below the last one accepted (a redelivered copy, a straggler of a
superseded attempt) is ignored; the first event of a newer attempt drops what is left of the older
one; when the buffer holds more than ``max_events`` events or ``max_bytes`` bytes, the oldest are
dropped. It does no I/O and knows nothing of subscriptions or results.
"""

from __future__ import annotations

import logging
from collections import deque

from ocbridge.client.protocol import StreamEvent

log = logging.getLogger(__name__)

__all__ = ["EventBuffer"]


class EventBuffer:
    """Accepted events of one task, oldest first, with the counters a :class:`TaskHandle` shows.

    ``attempt`` and ``last_seq`` are the latest event accepted (0 before any); ``dropped`` counts
    events dropped because the buffer was full, ``ignored`` duplicates and superseded events."""

    def __init__(self, task_id: str, max_events: int, max_bytes: int) -> None:
        self.task_id = task_id
        self.max_events = max(1, max_events)
        self.max_bytes = max(1, max_bytes)
        #: (event, size on the wire) in the order they are to be read.
        self.events: deque[tuple[StreamEvent, int]] = deque()
        self.bytes = 0
        self.attempt = 0
        self.last_seq = 0
        self.dropped = 0
        self.ignored = 0
        self._warned_overflow = False

    def __len__(self) -> int:
        return len(self.events)

    def accept(self, event: StreamEvent, size: int) -> bool:
        """Buffer ``event`` (``size``: its bytes on the wire) unless it is a duplicate or stale;
        whether it was buffered. The event is stored with its attempt filled in."""
        attempt = event.attempt
        if attempt is None:
            # A Station-era sidecar: no attempt field, seq starts over at 1 on a new attempt.
            attempt = self.attempt or 1
            if event.seq == 1 and self.last_seq >= 1:
                attempt += 1
        if (attempt, event.seq) <= (self.attempt, self.last_seq):
            self.ignored += 1
            return False
        if attempt > self.attempt and self.attempt:
            self.ignored += len(self.events)
            self.events.clear()
            self.bytes = 0
            log.info("task %s: attempt %d started; events of attempt %d are superseded",
                     self.task_id, attempt, self.attempt)
        self.attempt, self.last_seq = attempt, event.seq
        if event.attempt != attempt:
            event = event.model_copy(update={"attempt": attempt})
        self.events.append((event, size))
        self.bytes += size
        while len(self.events) > 1 and (len(self.events) > self.max_events or self.bytes > self.max_bytes):
            _, dropped = self.events.popleft()
            self.bytes -= dropped
            self.dropped += 1
            if not self._warned_overflow:
                self._warned_overflow = True
                log.warning("task %s: event buffer full (%d events, %d bytes); dropping the oldest unread events",
                            self.task_id, self.max_events, self.max_bytes)
        return True

    def pop(self) -> StreamEvent | None:
        """The oldest unread event, or ``None`` when none is buffered."""
        if not self.events:
            return None
        event, size = self.events.popleft()
        self.bytes -= size
        return event
