"""The git layer: clone/pull/checkout a task's workspace, report what a task changed, and run
deterministic git operations (branch, commit, push, status, diff), with credentials that never
reach a URL, a file in the workspace, a command line or an event.

Modules: :mod:`.settings` (``git:`` config), :mod:`.safety` (URL/ref checks, URL redaction),
:mod:`.runner` (hardened subprocess, credentials), :mod:`.repo` (read-only queries),
:mod:`.workspace_repo` (prepare a workspace), :mod:`.changes` + :mod:`.snapshot` (what changed),
:mod:`.operations` (branch/commit/push/status/diff).
"""

from .changes import Baseline, ChangeSet, begin, changes_since, collect, still_comparable
from .errors import GitError, GitInputError, GitTimeout
from .operations import branch, commit, diff, push, run_op, status
from .runner import GitCredentials, GitResult, run_git
from .safety import (
    RemoteUrl,
    check_branch_name,
    check_ref,
    check_remote_name,
    normalize_url,
    parse_remote_url,
    redact_git_url,
)
from .settings import GitSettings, resolve_token
from .workspace_repo import Emit, RepoState, prepare

__all__ = [
    "Baseline",
    "ChangeSet",
    "Emit",
    "GitCredentials",
    "GitError",
    "GitInputError",
    "GitResult",
    "GitSettings",
    "GitTimeout",
    "RemoteUrl",
    "RepoState",
    "begin",
    "branch",
    "changes_since",
    "check_branch_name",
    "check_ref",
    "check_remote_name",
    "collect",
    "commit",
    "diff",
    "normalize_url",
    "parse_remote_url",
    "prepare",
    "push",
    "redact_git_url",
    "resolve_token",
    "run_git",
    "run_op",
    "status",
    "still_comparable",
]
