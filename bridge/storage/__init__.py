"""Where state and files live: key-value stores and object stores (NATS, or folders for the
in-process backends), and the session records Station reads."""

from .sessions import SessionStore
from .stores import (
    ArtifactStore,
    FolderArtifacts,
    FolderKeyValue,
    KeyValueStore,
    NatsArtifacts,
    NatsKeyValue,
    get_json,
)

__all__ = [
    "ArtifactStore",
    "FolderArtifacts",
    "FolderKeyValue",
    "KeyValueStore",
    "NatsArtifacts",
    "NatsKeyValue",
    "SessionStore",
    "get_json",
]
