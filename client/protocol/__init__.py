"""The wire contract between Station, the client and the sidecar, in one place.

Every message model, the names of subjects, streams and buckets, KV key rules and subject rules.
Pure data: no I/O, and nothing here imports the client or the sidecar (both import this).

Additions beyond Station's protocol stay optional and compatible: statuses ``timeout`` and
``cancelled``, ``metrics.cost``, tool ``duration``, the cancel message, task records, input files,
changes and patches, and the workspace operations.
"""

from pydantic import ValidationError

from .base import WireModel, describe_validation_error, iso_now
from .body import BodyError, read_json_object
from .errors import ErrorType, OcbridgeError, error_type_of
from .events import EventGit, EventSession, EventType, StreamEvent, ToolInfo
from .fleet import DeadLetterStatus, FleetSidecar, FleetStatus, QueueStatus, SidecarHeartbeat, WaitingTask
from .keys import cancel_key, kv_key, kv_name, record_key
from .naming import STATION_BUCKET_TTL, CallbackScope, Naming, naming_from_env
from .ops import GitOpRequest, GitOpResult, OpName
from .results import FileChange, ResultGit, ResultMetrics, ResultSession, ResultWorkspace, TaskResult, TaskStatus
from .spill import SpillError
from .state import SessionGit, SessionState, TaskRecord
from .subjects import callback_problem, is_concrete_subject
from .tasks import (
    CancelRequest,
    CleanupPolicy,
    GitSpec,
    ModelRef,
    Scope,
    SessionSpec,
    Task,
    TaskCallback,
    WorkspaceSpec,
)

__all__ = [
    "STATION_BUCKET_TTL",
    "BodyError",
    "CallbackScope",
    "CancelRequest",
    "CleanupPolicy",
    "DeadLetterStatus",
    "ErrorType",
    "EventGit",
    "EventSession",
    "EventType",
    "FileChange",
    "FleetSidecar",
    "FleetStatus",
    "GitOpRequest",
    "GitOpResult",
    "GitSpec",
    "ModelRef",
    "Naming",
    "OcbridgeError",
    "OpName",
    "QueueStatus",
    "ResultGit",
    "ResultMetrics",
    "ResultSession",
    "ResultWorkspace",
    "Scope",
    "SessionGit",
    "SessionSpec",
    "SessionState",
    "SidecarHeartbeat",
    "SpillError",
    "StreamEvent",
    "Task",
    "TaskCallback",
    "TaskRecord",
    "TaskResult",
    "TaskStatus",
    "ToolInfo",
    "ValidationError",
    "WaitingTask",
    "WireModel",
    "WorkspaceSpec",
    "callback_problem",
    "cancel_key",
    "describe_validation_error",
    "error_type_of",
    "is_concrete_subject",
    "iso_now",
    "kv_key",
    "kv_name",
    "naming_from_env",
    "read_json_object",
    "record_key",
]
