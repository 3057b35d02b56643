"""One task, engine-agnostic: workspace, git, session, prompt, live events, changes, one result;
and the workspace operations (open, close, git) outside any prompt."""

from .emitter import EventEmitter, Publish
from .ops import OpsHandler
from .retry import RetryTask
from .runtime import Runtime, build_runtime
from .task import TaskPipeline

__all__ = ["EventEmitter", "OpsHandler", "Publish", "RetryTask", "Runtime", "TaskPipeline", "build_runtime"]
