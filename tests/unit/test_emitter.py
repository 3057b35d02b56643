"""The event emitter: numbering, the attempt, coalesced text, redaction that holds up when a secret
straddles a flush, and timed flushes that are kept and awaited."""

from __future__ import annotations

import asyncio

from ocbridge.bridge.pipeline.emitter import EventEmitter
from ocbridge.bridge.redact import MASK, Redactor
from ocbridge.client.protocol import EventType, StreamEvent, ToolInfo

SECRET = "hunter2-very-secret-value"


class Sink(list):
    """Collects published events; ``arrived`` is set at each one."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()

    async def publish(self, subject: str, data: bytes) -> None:
        self.append(StreamEvent.from_wire(data))
        self.arrived.set()


def emitter(sink: Sink, *, interval: float = 0.0, attempt: int | None = None, secrets=(SECRET,)) -> EventEmitter:
    return EventEmitter(sink.publish, "stream.t1", "t1", Redactor(secrets), flush_interval=interval, attempt=attempt)


def joined(events: list[StreamEvent], kind: str = "text") -> str:
    return "".join(e.content or "" for e in events if e.type == kind)


async def test_seq_and_attempt_on_every_event():
    sink = Sink()
    e = emitter(sink, attempt=2)
    await e.emit(EventType.PROMPT_SENT, content="go")
    await e.delta(EventType.TEXT, "hi")
    await e.aclose()
    assert [(x.seq, x.attempt, x.type) for x in sink] == [(1, 2, "prompt_sent"), (2, 2, "text")]
    assert e.count == 2


async def test_without_secrets_deltas_pass_through_unchanged():
    sink = Sink()
    e = emitter(sink, secrets=())
    for piece in ("Hel", "lo ", "hunt"):
        await e.delta(EventType.TEXT, piece)
    assert [x.content for x in sink] == ["Hel", "lo ", "hunt"]  # nothing held back


async def test_a_secret_straddling_a_timed_flush_is_masked():
    sink = Sink()
    e = emitter(sink, interval=0.001)
    await e.delta(EventType.TEXT, "the key is hunt")
    await sink.arrived.wait()  # the timed flush published what was safe
    assert [x.content for x in sink] == ["the key is "]  # "hunt" may begin the secret: held
    await e.delta(EventType.TEXT, "er2-very-secret-value, done")
    await e.aclose()
    assert joined(sink) == f"the key is {MASK}, done"


async def test_a_secret_straddling_a_size_flush_is_masked():
    sink = Sink()
    e = emitter(sink, interval=10)
    await e.delta(EventType.TEXT, "x" * 4090 + SECRET[:10])  # over the buffer limit: flushed now
    assert len(sink) == 1 and sink[0].content == "x" * 4090
    await e.delta(EventType.TEXT, SECRET[10:] + " end")
    await e.aclose()
    assert joined(sink) == "x" * 4090 + f"{MASK} end"


async def test_a_held_tail_waits_across_other_events_and_is_published_at_the_end():
    sink = Sink()
    e = emitter(sink)
    await e.delta(EventType.THINKING, "I will use hunter2-")
    await e.delta(EventType.TEXT, "reply hunter2")
    await e.tool(EventType.TOOL_START, ToolInfo(name="bash", callID="c1"))
    await e.delta(EventType.THINKING, "very-secret-value now")
    await e.aclose()  # the text tail "hunter2" never got its continuation: published as is
    assert joined(sink, "thinking") == f"I will use {MASK} now"
    assert joined(sink, "text") == "reply hunter2"
    assert SECRET not in "".join(x.content or "" for x in sink)
    assert [x.seq for x in sink] == list(range(1, len(sink) + 1))


async def test_timed_flushes_are_tracked_and_awaited_at_the_end():
    release = asyncio.Event()
    sink = Sink()

    async def slow_publish(subject: str, data: bytes) -> None:
        await sink.publish(subject, data)
        await release.wait()

    e = EventEmitter(slow_publish, "stream.t1", "t1", Redactor([SECRET]), flush_interval=0.001)
    await e.delta(EventType.TEXT, "hello hunt")
    await sink.arrived.wait()  # a timed flush is publishing, and blocked
    assert len(e._flushes) == 1  # kept: never garbage-collected mid-publish
    closing = asyncio.create_task(e.aclose())
    release.set()
    await closing
    assert not e._flushes
    assert [x.content for x in sink] == ["hello ", "hunt"]
