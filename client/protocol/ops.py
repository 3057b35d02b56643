"""Workspace operations outside any prompt (Station's coding_open / coding_branch / coding_commit /
coding_push / coding_close), asked on the ops subject with a request/reply."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_serializer

from .base import Name, WireModel
from .errors import ErrorType
from .results import FileChange
from .tasks import CleanupPolicy, GitSpec, Scope

__all__ = ["GitOpRequest", "GitOpResult", "OpName"]


#: Every operation the sidecar answers on the ops subject: the git ones plus opening and closing a
#: session's workspace (Station's coding_open / coding_close).
OpName = Literal["open", "close", "branch", "commit", "push", "status", "diff"]


class GitOpRequest(WireModel):
    """A git operation on a session's workspace (Station's coding_branch / coding_commit / coding_push)."""

    op: OpName
    #: Session (or workspace name) whose workspace the operation acts on.
    session: Name | None = Field(default=None, max_length=200)
    workspace: Name | None = None
    #: branch: the branch to create or switch to; push: the branch to push (default: the current one).
    branch: Name | None = None
    #: branch: create it when it does not exist (default true).
    create: bool | None = None
    #: commit: the commit message.
    message: str | None = None
    #: commit: stage every change (new, modified, deleted files) first (default true).
    add_all: bool | None = Field(default=None, alias="addAll")
    #: push: remote name (default ``origin``) and whether to set the branch's upstream.
    remote: str | None = None
    set_upstream: bool | None = Field(default=None, alias="setUpstream")
    #: diff: commit or ref to compare the work tree with (default ``HEAD``).
    base: str | None = None
    #: push: a token for this push (else the session's / sidecar's); in memory a SecretStr.
    token: SecretStr | None = None
    token_from_kv: str | None = Field(default=None, alias="tokenFromKV")
    #: open: repository to clone (or pull) into the workspace, session title, lifetime of the workspace.
    git: GitSpec | None = None
    title: str | None = None
    scope: Scope | None = None
    scope_id: str | None = Field(default=None, alias="scopeID")
    cleanup: CleanupPolicy | None = None
    #: close: whether the work succeeded (``on_success`` cleans up only then).
    success: bool | None = None
    #: commit: author and committer (else the sidecar's ``git.user_name`` / ``git.user_email``).
    author_name: Name | None = Field(default=None, alias="authorName", max_length=200)
    author_email: Name | None = Field(default=None, alias="authorEmail", max_length=200)

    @field_serializer("token", when_used="json")
    def _reveal_token(self, token: SecretStr | None) -> str | None:
        return token.get_secret_value() if token is not None else None


class GitOpResult(WireModel):
    """Outcome of a :class:`GitOpRequest`; every figure comes from git itself."""

    ok: bool
    op: OpName
    #: open: the session name, its engine session id, the workspace and whether a repo was cloned.
    session: str | None = None
    opencode_id: str | None = Field(default=None, alias="opencodeID")
    workspace_path: str | None = Field(default=None, alias="workspacePath")
    repo_cloned: bool | None = Field(default=None, alias="repoCloned")
    managed: bool | None = None
    #: close: whether the workspace was deleted.
    cleaned_up: bool | None = Field(default=None, alias="cleanedUp")
    branch: str | None = None
    previous_branch: str | None = Field(default=None, alias="previousBranch")
    created: bool | None = None
    switched_to: str | None = Field(default=None, alias="switchedTo")
    #: commit: the new commit's id.
    commit_hash: str | None = Field(default=None, alias="commitHash")
    #: HEAD after the operation.
    commit: str | None = None
    files_changed: int | None = Field(default=None, alias="filesChanged")
    insertions: int | None = None
    deletions: int | None = None
    remote: str | None = None
    message: str | None = None
    dirty: bool | None = None
    upstream: str | None = None
    ahead: int | None = None
    behind: int | None = None
    changes: list[FileChange] | None = None
    patch: str | None = None
    patch_truncated: bool | None = Field(default=None, alias="patchTruncated")
    error: str | None = None
    error_type: ErrorType | str | None = Field(default=None, alias="errorType")
    #: Addition: fields moved to the object store because the message would exceed the server's
    #: ``max_payload`` (field name -> object name); the client puts them back (:mod:`.spill`).
    spilled: dict[str, str] | None = None
