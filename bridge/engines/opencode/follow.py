"""Following one OpenCode run once its prompt is sent: relaying its events until it is over, and
building its outcome.

The run ends on ``session.idle`` after our user message was seen, or, as a safety net when the
stream is quiet or lost events, when ``GET /session/status`` and the session history say so. The
outcome comes from what the stream told, or from the history when the stream may have missed
something (a reconnect, a queue overflow, an error or an abort).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ocbridge.bridge.engines.base import EngineError, EngineUnavailable, EventSink, RunOutcome

from .api import RETRY_SERVER, RETRY_STORE, STORE_BUSY, OpenCodeAPI
from .events import GAP, SERVER_LOST, Event, Subscription
from .settings import OpenCodeSettings
from .translate import RunTranslator, describe_error, outcome_from_messages, run_finished

__all__ = ["STREAM_GRACE", "RunFollower", "ServerLost"]

log = logging.getLogger(__name__)


class ServerLost(EngineUnavailable):
    """The server died while the run was being followed (its supervisor restarts it)."""


# How long the event stream may lag behind the HTTP state once a poll says the run is over.
STREAM_GRACE = 5.0


class RunFollower:
    """Follows runs for an :class:`~.engine.OpenCodeEngine` (one instance serves all its runs).

    ``api`` returns the engine's API (raising :class:`EngineError` once it is closed),
    ``stream_up`` whether its event stream is connected; ``exchanges`` is the engine's session id
    -> exchanges (user messages) count, read and updated here.
    """

    def __init__(
        self,
        settings: OpenCodeSettings,
        api: Callable[[], OpenCodeAPI],
        stream_up: Callable[[], bool],
        exchanges: dict[str, int],
    ) -> None:
        self.settings = settings
        self._api = api
        self._stream_up = stream_up
        self._exchanges = exchanges

    async def follow(self, key: str, sub: Subscription, tr: RunTranslator, on_event: EventSink) -> None:
        """Feed events to ``on_event`` until the run is over (idle after our prompt was seen)."""
        s = self.settings
        deadline = time.monotonic() + s.max_run_seconds
        next_poll = time.monotonic() + s.status_poll_interval
        poll = _PollState()
        while True:
            now = time.monotonic()
            if now > deadline:
                raise EngineError(f"OpenCode run did not finish within {s.max_run_seconds:.0f}s")
            if poll.finish_by is not None and now >= poll.finish_by:
                return  # the history says it is over and the stream never caught up
            wake = min(next_poll, deadline, poll.finish_by or deadline)
            item = await sub.get(timeout=max(0.05, wake - now))
            if item == SERVER_LOST:
                raise ServerLost(
                    "OpenCode server was lost during the run (it is being restarted)", retry_after=RETRY_SERVER
                )
            if item == GAP:
                tr.lossy = True  # events may be missing: the outcome comes from the history
            if isinstance(item, Event):
                for event in tr.feed(item.payload):
                    await on_event(event)
                if _is_idle(item) and tr.saw_user_message:
                    return
                if item.type == "session.error" and not tr.saw_user_message:
                    return  # rejected before our message existed (unknown agent): no idle follows
                continue
            # Quiet for a while, or the stream dropped (GAP): ask OpenCode directly.
            next_poll = time.monotonic() + s.status_poll_interval
            if poll.finish_by is None and await self._poll(key, tr, poll):
                if not self._stream_up():
                    return
                # The stream lags the HTTP state (a freshly loaded directory instance delivers its
                # events late): give it a moment so live events are not lost.
                poll.finish_by = time.monotonic() + STREAM_GRACE

    async def _poll(self, key: str, tr: RunTranslator, poll: _PollState) -> bool:
        """The safety net: whether status and history say the run is over."""
        s, now = self.settings, time.monotonic()
        try:
            status = await self._api().session_status(key, timeout=5.0)
            messages = [] if tr.session_id in status else await self._api().messages(key, tr.session_id)
        except EngineError as exc:
            poll.failing_since = poll.failing_since or now
            if now - poll.failing_since >= max(15.0, 3 * s.status_poll_interval):
                raise EngineUnavailable(
                    f"OpenCode stopped answering during the run: {exc}", retry_after=RETRY_SERVER
                ) from exc
            return False
        poll.failing_since = None
        if tr.session_id in status:
            poll.idle_since = None
            return False
        # Idle. Right after the prompt OpenCode may be idle for a moment (loading the directory)
        # before it turns busy, so only a finished reply or a lasting idle state ends the run.
        poll.idle_since = poll.idle_since or now
        idle_for = now - poll.idle_since
        if not any((m.get("info") or {}).get("id") == tr.user_message_id for m in messages):
            if idle_for >= 10.0:
                raise EngineError("OpenCode never started the prompt (session idle, prompt not in its history)")
            return False
        return run_finished(messages, tr.user_message_id) or idle_for >= 2.0

    async def outcome(self, key: str, sid: str, message_id: str, tr: RunTranslator) -> RunOutcome:
        """How the finished run ended; :class:`EngineUnavailable` when OpenCode's store failed it."""
        outcome = await self._read_outcome(key, sid, message_id, tr)
        if outcome.error and STORE_BUSY.search(outcome.error):
            # OpenCode's own store refused a query (its lock held too long): not the task's fault.
            self._exchanges.pop(sid, None)
            raise EngineUnavailable(f"OpenCode's database refused a query: {outcome.error}", retry_after=RETRY_STORE)
        return outcome

    async def _read_outcome(self, key: str, sid: str, message_id: str, tr: RunTranslator) -> RunOutcome:
        # After a gap in the stream (reconnect, overflow) the stream's account may be partial:
        # text, tokens and tool calls then come from the history alone.
        streamed = None if tr.lossy else tr.outcome()
        if streamed is not None:
            streamed.message_count = await self._count_exchange(key, sid)
            return streamed
        if tr.lossy:
            log.info("OpenCode session %s: events were lost during the run; its outcome comes from the history", sid)
        api = self._api()
        messages = await api.messages(key, sid)
        # On abort, session.idle precedes the message's final update by a moment: wait for it.
        for _ in range(20):
            if run_finished(messages, message_id) or not (tr.saw_assistant or tr.lossy):
                break
            await asyncio.sleep(0.05)
            messages = await api.messages(key, sid)
        outcome = outcome_from_messages(messages, message_id, directory=key)
        if not outcome.error and not outcome.aborted and tr.error is not None:
            # An error before any assistant message (unknown model or agent).
            if tr.error.get("name") == "MessageAbortedError":
                outcome.aborted = True
            else:
                outcome.error, outcome.error_type = describe_error(tr.error)
        if not tr.lossy and not outcome.prompt_tokens and not outcome.completion_tokens:
            outcome.prompt_tokens, outcome.completion_tokens = tr.prompt_tokens, tr.completion_tokens
            outcome.cost = outcome.cost or tr.cost
        if not tr.lossy:
            outcome.tool_calls = max(outcome.tool_calls, tr.tool_calls)
        self._exchanges[sid] = outcome.message_count
        for path in tr.files_edited:
            if path not in outcome.files_edited:
                outcome.files_edited.append(path)
        return outcome

    async def _count_exchange(self, key: str, sid: str) -> int:
        """Exchanges in the session including this run: counted once from the history, then kept
        here, so a normal run needs no history read at all."""
        if sid in self._exchanges:
            self._exchanges[sid] += 1
        else:
            messages = await self._api().messages(key, sid)
            self._exchanges[sid] = sum(1 for m in messages if (m.get("info") or {}).get("role") == "user")
        return self._exchanges[sid]


@dataclass
class _PollState:
    idle_since: float | None = None
    failing_since: float | None = None
    finish_by: float | None = None


def _is_idle(event: Event) -> bool:
    if event.type == "session.idle":
        return True
    status = event.properties.get("status")
    return event.type == "session.status" and isinstance(status, dict) and status.get("type") == "idle"
