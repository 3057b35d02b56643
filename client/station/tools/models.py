"""Inputs and outputs of Station's six coding tools, with Station's exact (snake_case) field names.

Outputs follow Station's Go structs: optional fields are left out when empty (``omitempty``), so
:meth:`ToolModel.dump` drops ``None`` values only. ``files_changed`` of ``code`` and
``coding_close`` is a list of Station ``FileChange`` objects (``path``, ``action``,
``lines_added``, ``lines_removed``); ``files_changed`` of ``coding_commit`` is a count, as in Station.

The input models are also the tools' JSON Schemas (:mod:`.schemas`): each ``Field(description=...)``
is what an LLM reads about that argument, so keep them short.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ocbridge.client.protocol import FileChange


class ToolModel(BaseModel):
    # Unknown arguments are refused: a misspelt argument would otherwise be silently dropped.
    model_config = ConfigDict(extra="forbid")

    def dump(self) -> dict[str, Any]:
        """The JSON-ready dict a tool returns (``None`` fields left out, like Go's ``omitempty``)."""
        return self.model_dump(mode="json", exclude_none=True)


# ------------------------------------------------------------------------------------------ inputs


#: The session argument of every tool but ``coding_open``.
SessionId = Annotated[str, Field(min_length=1, description="Coding session ID returned by coding_open.")]


class CodingOpenInput(ToolModel):
    repo_url: str | None = Field(default=None, description="Git repository to clone (HTTPS, SSH or git URL).")
    branch: str | None = Field(default=None, description="Branch to check out after cloning (default: the remote's).")
    workspace_path: str | None = Field(
        default=None, description="An existing workspace folder to work in. Omit for a managed workspace."
    )
    title: str | None = Field(default=None, description="Session title, to find the session again later.")
    scope: Literal["agent", "workflow"] | None = Field(
        default=None,
        description="Workspace lifetime: 'agent' (cleaned up with the session, default) or "
        "'workflow' (kept across the steps of a workflow).",
    )
    scope_id: str | None = Field(default=None, description="Workflow ID when scope is 'workflow'.")
    existing_session_id: str | None = Field(
        default=None,
        description="Continue an earlier session: its ID (ses_...) or part of its title (case-insensitive).",
    )


class CodeInput(ToolModel):
    session_id: SessionId
    instruction: str = Field(
        min_length=1,
        description="What the coding assistant should do, e.g. 'Fix the null pointer exception in auth.go'.",
    )
    context: str | None = Field(default=None, description="Additional context about the task (optional).")
    files: list[str] | None = Field(default=None, description="Specific files to focus on (optional).")


class CodingBranchInput(ToolModel):
    session_id: SessionId
    branch: str = Field(min_length=1, description="Branch name, e.g. 'feature/add-tests'.")
    create: bool = Field(default=True, description="Create the branch if it does not exist. Default: true.")


class CodingCommitInput(ToolModel):
    session_id: SessionId
    message: str = Field(min_length=1, description="Commit message describing the changes.")
    add_all: bool = Field(
        default=True, description="Stage all changes (new, modified, deleted files) first. Default: true."
    )


class CodingPushInput(ToolModel):
    session_id: SessionId
    remote: str = Field(default="origin", description="Remote name. Default: origin.")
    branch: str | None = Field(default=None, description="Branch to push. Default: the current branch.")
    set_upstream: bool = Field(
        default=False, description="Set the upstream of the branch (git push -u). Default: false."
    )


class CodingCloseInput(ToolModel):
    session_id: SessionId
    workspace_id: str | None = Field(default=None, description="workspace_id returned by coding_open (optional).")
    success: bool = Field(
        default=True,
        description="Whether the coding work succeeded (the on_success cleanup policy keeps the workspace "
        "of failed work). Default: true.",
    )


# ----------------------------------------------------------------------------------------- outputs


class FileChanged(ToolModel):
    """Station's ``FileChange``."""

    path: str
    action: Literal["created", "modified", "deleted", "renamed"]
    lines_added: int | None = None
    lines_removed: int | None = None
    #: Addition: the previous path of a renamed file.
    old_path: str | None = None

    @classmethod
    def from_change(cls, change: FileChange) -> FileChanged:
        action = "created" if change.status == "added" else change.status
        return cls(path=change.path, action=action, lines_added=change.insertions,
                   lines_removed=change.deletions, old_path=change.old_path)


class TraceToolCall(ToolModel):
    """One tool the coding agent used (Station's ``ToolCall``; durations in milliseconds)."""

    tool: str
    call_id: str | None = None
    input: dict[str, Any] | None = None
    output: str | None = None
    #: The tool's error message when it failed.
    error: str | None = None
    duration_ms: int | None = None


class TraceTokens(ToolModel):
    input: int = 0
    output: int = 0


class Trace(ToolModel):
    """What the agent did during one ``code`` call (Station's ``Trace``)."""

    session_id: str | None = None
    tokens: TraceTokens = Field(default_factory=TraceTokens)
    cost: float | None = None
    duration_ms: int | None = None
    tool_calls: list[TraceToolCall] = Field(default_factory=list)
    #: Reasoning ("thinking") the agent showed, one entry per block.
    reasoning: list[str] = Field(default_factory=list)
    #: Everything the agent said, in order.
    text: str | None = None


class CodingOpenOutput(ToolModel):
    session_id: str
    workspace_path: str
    workspace_id: str | None = None
    repo_cloned: bool | None = None
    managed: bool = False


class CodeOutput(ToolModel):
    success: bool
    summary: str = ""
    files_changed: list[FileChanged] | None = None
    error: str | None = None
    tokens_used: int | None = None
    cost: float | None = None
    trace: Trace | None = None


class CodingBranchOutput(ToolModel):
    success: bool
    branch: str
    created: bool = False
    switched_to: bool = False
    previous_branch: str | None = None
    error: str | None = None


class CodingCommitOutput(ToolModel):
    success: bool
    commit_hash: str | None = None
    message: str
    files_changed: int | None = None
    insertions: int | None = None
    deletions: int | None = None
    error: str | None = None


class CodingPushOutput(ToolModel):
    success: bool
    remote: str
    branch: str
    message: str | None = None
    error: str | None = None


class CodingCloseOutput(ToolModel):
    ok: bool
    files_changed: list[FileChanged] | None = None
    cleaned_up: bool = False


#: Tool name -> (input model, output model).
TOOL_MODELS: dict[str, tuple[type[ToolModel], type[ToolModel]]] = {
    "coding_open": (CodingOpenInput, CodingOpenOutput),
    "code": (CodeInput, CodeOutput),
    "coding_branch": (CodingBranchInput, CodingBranchOutput),
    "coding_commit": (CodingCommitInput, CodingCommitOutput),
    "coding_push": (CodingPushInput, CodingPushOutput),
    "coding_close": (CodingCloseInput, CodingCloseOutput),
}
