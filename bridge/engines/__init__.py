"""Agent engines behind one interface (:class:`Engine`): OpenCode over HTTP (:mod:`.opencode`),
``opencode run`` and Claude Code (:mod:`.cli`). :class:`EngineHost` builds and runs the configured
one."""

from .base import AgentEvent, Engine, EngineError, EventSink, PromptRequest, RunOutcome, SessionHandle
from .factory import EngineHost, build_engine

__all__ = [
    "AgentEvent",
    "Engine",
    "EngineError",
    "EngineHost",
    "EventSink",
    "PromptRequest",
    "RunOutcome",
    "SessionHandle",
    "build_engine",
]
