"""The opencode-bridge sidecar: runs Station's coding tasks from NATS JetStream on an agent engine.

The life of a task, by package:

- :mod:`.jetstream`: delivery. Pull a task, dead-letter what cannot be read, hand it to the
  pipeline, publish its one result, ack.
- :mod:`.pipeline`: one task. Workspace, git, session, prompt, live events, changes, the result;
  and the workspace operations outside any prompt.
- :mod:`.storage`: KV buckets and the object store (or folders), session records.
- :mod:`.workspace`: confined folders, preparation, the git layer (:mod:`.workspace.git`), cleanup.
- :mod:`.engines`: the agents behind one interface (OpenCode HTTP, ``opencode run``, Claude Code,
  and :class:`ScriptedEngine` for tests).
- :mod:`.inprocess`: the same pipeline without NATS.
- :mod:`.offline_model`: the offline scripted model for the demo and the tests.

::

    from ocbridge.bridge import Sidecar, load_config

    sidecar = Sidecar(load_config("sidecar.yaml"))
    await sidecar.start()
"""

from .config import BridgeConfig, ConfigError, load_config
from .engines import AgentEvent, Engine, EngineError, PromptRequest, RunOutcome, ScriptedEngine, SessionHandle
from .inprocess import LocalRunner
from .redact import Redactor, default_redactor
from .sidecar import Sidecar

__all__ = [
    "AgentEvent",
    "BridgeConfig",
    "ConfigError",
    "Engine",
    "EngineError",
    "LocalRunner",
    "PromptRequest",
    "Redactor",
    "RunOutcome",
    "ScriptedEngine",
    "SessionHandle",
    "Sidecar",
    "default_redactor",
    "load_config",
]
