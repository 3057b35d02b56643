"""Agent engines behind one interface (:class:`Engine`): OpenCode over HTTP (:mod:`.opencode`),
``opencode run`` and Claude Code (:mod:`.cli`), and :class:`ScriptedEngine`, a test double that
replays canned events (its steps are in :mod:`.scripted`). :class:`EngineHost` builds and runs the
configured one."""

from .base import (
    AgentEvent,
    Engine,
    EngineError,
    EngineUnavailable,
    EventSink,
    PromptRequest,
    RunOutcome,
    SessionHandle,
)
from .factory import EngineHost, build_engine
from .scripted import ScriptedEngine

__all__ = [
    "AgentEvent",
    "Engine",
    "EngineError",
    "EngineHost",
    "EngineUnavailable",
    "EventSink",
    "PromptRequest",
    "RunOutcome",
    "ScriptedEngine",
    "SessionHandle",
    "build_engine",
]
