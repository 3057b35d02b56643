"""Workspace folders, confined under the sidecar's workspace root.

Station sends either a bare name (``repo-ws``) or an absolute path from its own file system
(``/workspaces/station-coding/ws_1736...``). A path inside the root is used as is; any other
absolute path is re-rooted under the root (``/tmp/x`` -> ``<root>/tmp/x``), so nothing can point
outside. ``..`` components and symlinks that lead out of the root are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ocbridge.client.protocol import ErrorType, OcbridgeError


class WorkspaceError(OcbridgeError, ValueError):
    """The workspace name is unusable (escapes the root, empty, ...)."""

    default_error_type = ErrorType.INVALID_TASK


@dataclass(frozen=True, slots=True)
class Workspace:
    name: str
    path: Path
    created: bool


def resolve_workspace_path(root: Path, name: str) -> Path:
    """Map a workspace name to an absolute path under ``root`` without touching the disk."""
    if not name or not name.strip() or "\x00" in name:
        raise WorkspaceError("workspace name is empty or contains NUL")
    root = root.resolve()
    pure = PurePosixPath(name)
    if ".." in pure.parts:
        raise WorkspaceError(f"workspace name {name!r} must not contain '..'")
    if pure.is_absolute():
        try:
            relative = PurePosixPath(*Path(name).parts).relative_to(PurePosixPath(root))
        except ValueError:
            relative = pure.relative_to("/")
    else:
        relative = pure
    parts = [p for p in relative.parts if p not in ("", ".")]
    if not parts:
        raise WorkspaceError(f"workspace name {name!r} names the workspace root itself")
    return root.joinpath(*parts)


def open_workspace(root: Path, name: str) -> Workspace:
    """Create (or reuse) the workspace folder for ``name``; refuses symlink escapes."""
    path = resolve_workspace_path(root, name)
    real_root = root.resolve()
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise WorkspaceError(f"workspace {name!r} resolves outside the workspace root")
    if real == real_root:
        raise WorkspaceError(f"workspace name {name!r} names the workspace root itself")
    return Workspace(name=name, path=real, created=created)
