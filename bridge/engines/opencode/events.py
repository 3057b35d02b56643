"""One SSE connection to ``GET /global/event``, dispatched to per-session subscribers.

``/global/event`` carries the events of every directory instance, including instances loaded after
the connection opened and instances reloaded after ``/instance/dispose`` (verified on 1.18.33), each
wrapped as ``{"directory", "project", "payload": {"id", "type", "properties"}}``. One connection for
all directories keeps the engine's connection count constant.

Subscribers register *before* their prompt is sent, so no event of the run can be missed. When the
stream drops, every subscriber receives a :data:`GAP` marker (events may have been lost: poll), and
when the server process died, a :data:`SERVER_LOST` marker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ocbridge.bridge.engines.base import EngineError

from .api import OpenCodeAPI

log = logging.getLogger(__name__)

# Markers put in subscriber queues besides the event payloads.
GAP = "stream-gap"
SERVER_LOST = "server-lost"

# OpenCode sends ``server.heartbeat`` every 10 s: silence for longer than this means a dead stream.
READ_TIMEOUT = 35.0

# What one run may have queued and not consumed yet. Past either limit its events are dropped (the
# single reader never waits for a slow run) and the run is told with a GAP: it then builds its
# outcome from the session history, like after a reconnect.
QUEUE_EVENTS = 10_000
QUEUE_BYTES = 16 * 1024 * 1024
# One event larger than this is dropped unread (every run is then told with a GAP).
MAX_EVENT_BYTES = 16 * 1024 * 1024


@dataclass(slots=True)
class Event:
    """One OpenCode event: ``directory`` (``None`` for server-wide events) and its ``payload``."""

    directory: str | None
    payload: dict[str, Any]
    size: int = 0  # bytes of the SSE data it came from (what a queue holding it costs)

    @property
    def type(self) -> str:
        return str(self.payload.get("type", ""))

    @property
    def properties(self) -> dict[str, Any]:
        props = self.payload.get("properties")
        return props if isinstance(props, dict) else {}

    @property
    def session_id(self) -> str | None:
        sid = self.properties.get("sessionID")
        return sid if isinstance(sid, str) else None


Item = Event | str  # an event or a marker


class SSEParser:
    """Incremental Server-Sent Events parser (bytes in, ``data`` strings out).

    Handles CRLF/CR/LF line ends, multi-line ``data:``, comments (heartbeat lines starting with
    ``:``) and long lines (aiohttp's own line reader refuses lines over 128 KiB, and a tool output
    can be bigger). Memory stays bounded: an event over ``max_event`` bytes is dropped unread and
    counted in :attr:`dropped`.
    """

    def __init__(self, max_event: int = MAX_EVENT_BYTES) -> None:
        self.max_event = max_event
        self.dropped = 0
        self._buffer = bytearray()
        self._scan = 0  # where to resume looking for a line end (no quadratic rescans)
        self._data: list[str] = []
        self._size = 0  # characters of data in the current event
        self._skip_line = False  # inside an oversized line: drop up to its end
        self._skip_event = False  # inside an oversized event: drop up to its end

    def feed(self, chunk: bytes) -> list[str]:
        """Add received bytes; return the data of every event completed by them."""
        self._buffer += chunk
        out: list[str] = []
        pos = 0
        while True:
            cut = _line_end(self._buffer, max(pos, self._scan))
            if cut is None:
                break
            end, skip = cut
            if self._skip_line:
                self._skip_line = False
            else:
                self._line(self._buffer[pos:end].decode("utf-8", errors="replace"), out)
            pos = self._scan = end + skip
        del self._buffer[:pos]
        self._scan = max(0, len(self._buffer) - 1)  # a trailing CR may still become CRLF
        if len(self._buffer) > self.max_event:
            self._drop_event()
            self._skip_line = True
            self._buffer.clear()
            self._scan = 0
        return out

    def _drop_event(self) -> None:
        if not self._skip_event:
            self.dropped += 1
            log.warning("opencode events: dropped an event over %d MiB", self.max_event // (1024 * 1024))
        self._data, self._size, self._skip_event = [], 0, True

    def _line(self, line: str, out: list[str]) -> None:
        if not line:
            if self._data and not self._skip_event:
                out.append("\n".join(self._data))
            self._data, self._size, self._skip_event = [], 0, False
            return
        if line.startswith(":") or self._skip_event:
            return
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
            self._size += len(value)
            if self._size > self.max_event:
                self._drop_event()
        # "event", "id" and "retry" fields carry nothing OpenCode relies on.


def _line_end(buffer: bytearray, start: int) -> tuple[int, int] | None:
    """Index and length of the first line terminator at or after ``start``, or ``None``."""
    lf, cr = buffer.find(b"\n", start), buffer.find(b"\r", start)
    if cr == -1 and lf == -1:
        return None
    if cr == -1 or (lf != -1 and lf < cr):
        return lf, 1
    if cr + 1 == len(buffer):
        return None  # a CR at the end may be the first half of CRLF: wait for more
    return cr, 2 if buffer[cr + 1] == 0x0A else 1


def parse_global(data: str) -> Event | None:
    """Decode one ``/global/event`` data block (also accepts an unwrapped ``/event`` payload)."""
    try:
        obj = json.loads(data)
    except ValueError:
        log.warning("opencode events: undecodable event data (%d bytes)", len(data))
        return None
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("payload"), dict):
        directory = obj.get("directory")
        return Event(directory if isinstance(directory, str) else None, obj["payload"], len(data))
    return Event(None, obj, len(data))


@dataclass(eq=False)
class Subscription:
    """The queue of one run: events of its session and of its directory (``file.edited``).

    Bounded (``max_events``, ``max_bytes``) and never blocking: :meth:`put` drops an event that
    does not fit and queues a :data:`GAP` instead, so the run knows its stream is incomplete.
    Repeated markers are coalesced.
    """

    session_id: str
    directory: str
    max_events: int = QUEUE_EVENTS
    max_bytes: int = QUEUE_BYTES
    dropped: int = 0  # events dropped because the queue was full
    _items: collections.deque[Item] = field(default_factory=collections.deque, repr=False)
    _bytes: int = 0
    _ready: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Item) -> None:
        """Queue an event or a marker; never blocks."""
        if isinstance(item, Event):
            if len(self._items) >= self.max_events or self._bytes + item.size > self.max_bytes:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning(
                        "opencode events: run of session %s is %d events (%d KiB) behind; dropped %d event(s), "
                        "its outcome will be read from the session history",
                        self.session_id, len(self._items), self._bytes // 1024, self.dropped,
                    )  # fmt: skip
                item = GAP
            else:
                self._bytes += item.size
        if isinstance(item, str) and self._items and self._items[-1] == item:
            return
        self._items.append(item)
        self._ready.set()

    async def get(self, timeout: float) -> Item | None:
        """Next item, or ``None`` after ``timeout`` seconds."""
        if not self._items:
            self._ready.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                return None
        item = self._items.popleft()
        if isinstance(item, Event):
            self._bytes -= item.size
        return item


Listener = Callable[[Event], Awaitable[None]]


class EventHub:
    """Reads the event stream, reconnecting with backoff, and dispatches events by session id."""

    def __init__(self, api: OpenCodeAPI, *, backoff: float = 0.2, backoff_max: float = 5.0) -> None:
        self._api = api
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._subs: dict[str, set[Subscription]] = {}
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.connected = asyncio.Event()
        self.connections = 0  # how many times the stream (re)connected, for tests and logs

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` for every event (the engine answers permission requests this way)."""
        self._listeners.append(listener)

    def subscribe(self, session_id: str, directory: str) -> Subscription:
        """Start queueing the session's events. Call before sending the prompt."""
        sub = Subscription(session_id, directory)
        self._subs.setdefault(session_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.session_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.session_id]

    def broadcast(self, marker: str) -> None:
        """Put a marker in every subscriber queue."""
        for subs in self._subs.values():
            for sub in subs:
                sub.put(marker)

    async def start(self, wait: float = 10.0) -> None:
        """Start reading; wait up to ``wait`` seconds for the first connection."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="opencode-events")
        try:
            await asyncio.wait_for(self.connected.wait(), wait)
        except TimeoutError as exc:
            raise EngineError(f"OpenCode event stream did not connect within {wait:.0f}s") from exc

    def reconnect(self) -> None:
        """Drop the current connection and connect again at once (the server moved)."""
        self.connected.clear()
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.connected.clear()

    async def _run(self) -> None:
        delay = self._backoff
        while True:
            self._wake.clear()
            reader = asyncio.create_task(self._read_once())
            waker = asyncio.create_task(self._wake.wait())
            try:
                await asyncio.wait({reader, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (reader, waker):
                    task.cancel()
                await asyncio.gather(reader, waker, return_exceptions=True)
            if not reader.cancelled() and reader.exception() is not None:
                log.debug("opencode events: stream failed: %r", reader.exception())
            was_connected = self.connected.is_set()
            self.connected.clear()
            self.broadcast(GAP)
            if was_connected:
                log.info("opencode events: stream dropped, reconnecting")
                delay = self._backoff  # the stream had worked: reconnect quickly
            if self._wake.is_set():
                continue  # asked to reconnect (the server moved): no backoff
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            delay = min(delay * 2, self._backoff_max)

    async def _read_once(self) -> None:
        parser = SSEParser()
        async with self._api.stream("/global/event") as resp:
            while True:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # races a chunk's arrival, leaving this task (and stop()) hanging for ever.
                async with asyncio.timeout(READ_TIMEOUT):
                    chunk = await resp.content.readany()
                if not chunk:
                    return  # server closed the stream
                dropped = parser.dropped
                for data in parser.feed(chunk):
                    event = parse_global(data)
                    if event is not None:
                        await self._dispatch(event)
                if parser.dropped != dropped:
                    self.broadcast(GAP)  # whose event it was is unknown: every run reads its history

    async def _dispatch(self, event: Event) -> None:
        if event.type == "server.connected":
            self.connections += 1
            self.connected.set()
            # Events between the drop and now are lost: let runs check their status.
            if self.connections > 1:
                self.broadcast(GAP)
            return
        for listener in self._listeners:
            try:
                await listener(event)
            except Exception:
                log.exception("opencode events: listener failed on %s", event.type)
        sid = event.session_id
        if sid is not None:
            for sub in self._subs.get(sid, ()):
                sub.put(event)
        elif event.type == "file.edited" and event.directory:
            # file.edited names no session: it can only be attributed when a single run is in
            # progress in that directory (edit tools' own results name their files anyway).
            runs = [sub for subs in self._subs.values() for sub in subs if sub.directory == event.directory]
            if len(runs) == 1:
                runs[0].put(event)
