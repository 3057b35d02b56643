"""Where state and files live: key-value stores and object stores (NATS, or folders for the
in-process backends), and the session records Station reads."""

from .leases import Lease, MemoryKeyValue, SessionLeases
from .sessions import SessionStore
from .stores import (
    ArtifactStore,
    FolderArtifacts,
    FolderKeyValue,
    KeyValueStore,
    NatsArtifacts,
    NatsKeyValue,
    RevisionMismatch,
    get_json,
)

__all__ = [
    "ArtifactStore",
    "FolderArtifacts",
    "FolderKeyValue",
    "KeyValueStore",
    "Lease",
    "MemoryKeyValue",
    "NatsArtifacts",
    "NatsKeyValue",
    "RevisionMismatch",
    "SessionLeases",
    "SessionStore",
    "get_json",
]
