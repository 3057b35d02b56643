"""Building the ``trace`` of a ``code`` call from the task's live events."""

from __future__ import annotations

from ocbridge.client.protocol import EventType, StreamEvent, TaskResult

from .models import Trace, TraceTokens, TraceToolCall


class TraceRecorder:
    """An ``on_event`` callback that keeps what the trace needs: tool calls (matched start to end by
    call ID), reasoning blocks and the agent's text. A task run again (a higher ``attempt``)
    starts the trace over: the result is the last attempt's."""

    def __init__(self) -> None:
        self._attempt = 1
        self._reset()

    def _reset(self) -> None:
        self.calls: dict[str, TraceToolCall] = {}
        self.reasoning: list[str] = []
        self.text: list[str] = []
        self._last_type: str | None = None

    async def __call__(self, event: StreamEvent) -> None:
        self.record(event)

    def record(self, event: StreamEvent) -> None:
        """Consume one event."""
        attempt = event.attempt or 1
        if attempt > self._attempt:
            self._reset()
            self._attempt = attempt
        elif attempt < self._attempt:
            return  # a late event of an attempt that was given up
        kind = event.type
        if kind in (EventType.TOOL_START, EventType.TOOL_END) and event.tool is not None:
            tool = event.tool
            call = self.calls.setdefault(tool.call_id, TraceToolCall(tool=tool.name, call_id=tool.call_id))
            if tool.args is not None:
                call.input = tool.args
            if kind == EventType.TOOL_END:
                call.output = tool.output
                call.duration_ms = tool.duration
                if tool.error:
                    call.error = tool.output or "tool failed"
        elif kind == EventType.THINKING and event.content:
            # Reasoning arrives in coalesced chunks: consecutive chunks are one block.
            if self._last_type == EventType.THINKING and self.reasoning:
                self.reasoning[-1] += event.content
            else:
                self.reasoning.append(event.content)
        elif kind == EventType.TEXT and event.content:
            self.text.append(event.content)
        self._last_type = kind

    def trace(self, result: TaskResult) -> Trace:
        """The trace of the finished task."""
        metrics = result.metrics
        return Trace(
            session_id=result.session.opencode_id if result.session else None,
            tokens=TraceTokens(input=metrics.prompt_tokens, output=metrics.completion_tokens),
            cost=metrics.cost,
            duration_ms=metrics.duration,
            tool_calls=list(self.calls.values()),
            reasoning=[r.strip() for r in self.reasoning if r.strip()],
            text="".join(self.text) or None,
        )
