"""Workspaces: folders confined under the root (:mod:`.paths`), getting them ready and reporting
what a task changed (:mod:`.prepare`, with the git layer in :mod:`.git`), and deleting them when
their policy says so (:mod:`.janitor`)."""

from .janitor import WorkspaceJanitor, WorkspaceRecord
from .paths import Workspace, WorkspaceError, open_workspace, resolve_workspace_path
from .prepare import WorkspaceFailure, WorkspaceFlow

__all__ = [
    "Workspace",
    "WorkspaceError",
    "WorkspaceFailure",
    "WorkspaceFlow",
    "WorkspaceJanitor",
    "WorkspaceRecord",
    "open_workspace",
    "resolve_workspace_path",
]
