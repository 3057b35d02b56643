"""Pure translation of OpenCode events and messages into the engine interface's terms.

:class:`RunTranslator` turns the event payloads of one run into :class:`AgentEvent` s (live) and
:func:`outcome_from_messages` builds the :class:`RunOutcome` from the session history once the run
is over. Neither does any I/O, so both are unit-tested against captured payloads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ocbridge.bridge.engines.base import AgentEvent, RunOutcome
from ocbridge.client.protocol import ToolInfo

JSON = dict[str, Any]

# Message errors that come from the model provider rather than from OpenCode itself.
PROVIDER_ERRORS = frozenset(
    {"APIError", "ProviderAuthError", "MessageOutputLengthError", "ContextOverflowError", "ContentFilterError"}
)
ABORTED_ERROR = "MessageAbortedError"
# Tools whose input names the file they change (for files_edited when file.edited is ambiguous).
EDIT_TOOLS = frozenset({"write", "edit", "multiedit"})


def describe_error(error: JSON) -> tuple[str, str]:
    """``(message, error_type)`` for an OpenCode ``{name, data}`` error."""
    name = str(error.get("name") or "UnknownError")
    data = error.get("data") if isinstance(error.get("data"), dict) else {}
    message = str(data.get("message") or "").strip()
    # UnknownError repeats itself with a stack trace in a second session.error: keep the first line.
    message = message.splitlines()[0] if message else ""
    status = data.get("statusCode")
    if name in PROVIDER_ERRORS:
        prefix = f"{name} (HTTP {status})" if status else name
        return (f"{prefix}: {message}" if message else prefix), "provider_error"
    return (f"{name}: {message}" if message else name), "engine_error"


@dataclass
class RunTranslator:
    """Stateful translator of one run's events (one session, one prompt).

    Only parts of assistant messages count: the user's own prompt also arrives as a text part.
    Roles come from ``message.updated``; ``user_message_id`` (our prompt's id) is known up front.
    """

    session_id: str
    user_message_id: str | None = None
    roles: dict[str, str] = field(default_factory=dict)
    part_types: dict[str, str] = field(default_factory=dict)
    streamed: dict[str, str] = field(default_factory=dict)  # part id -> text sent as deltas so far
    started_tools: set[str] = field(default_factory=set)
    ended_tools: set[str] = field(default_factory=set)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    tool_calls: int = 0
    files_edited: list[str] = field(default_factory=list)
    error: JSON | None = None  # first session.error of the run
    #: Events may be missing (the stream reconnected or the run's queue overflowed): the outcome
    #: must then be read from the session history, not from :meth:`outcome`.
    lossy: bool = False
    saw_user_message: bool = False
    saw_assistant: bool = False
    assistant_infos: dict[str, JSON] = field(default_factory=dict)  # message id -> latest info
    final_texts: dict[str, dict[str, str]] = field(default_factory=dict)  # message id -> part id -> text

    def feed(self, payload: JSON) -> list[AgentEvent]:
        """Consume one event payload ``{type, properties}``; return the agent events it produces."""
        kind = payload.get("type")
        props = payload.get("properties") or {}
        if kind == "file.edited":
            self._file_edited(props.get("file"))
            return []
        if props.get("sessionID") != self.session_id:
            return []
        if kind == "message.updated":
            info = props.get("info") or {}
            if info.get("id") and info.get("role"):
                self.roles[info["id"]] = info["role"]
                if info["id"] == self.user_message_id or (self.user_message_id is None and info["role"] == "user"):
                    self.saw_user_message = True
                if info["role"] == "assistant":
                    self.saw_assistant = True
                    self.assistant_infos[info["id"]] = info
            return []
        if kind == "message.part.delta":
            return self._delta(props)
        if kind == "message.part.updated":
            return self._part(props.get("part") or {})
        if kind == "session.error" and self.error is None and isinstance(props.get("error"), dict):
            self.error = props["error"]
        return []

    # ----------------------------------------------------------------------------- internals

    def _is_assistant(self, message_id: str | None) -> bool:
        if not message_id or message_id == self.user_message_id:
            return False
        # A part may in theory precede its message.updated: only a known user role excludes it.
        return self.roles.get(message_id, "assistant") == "assistant"

    def _delta(self, props: JSON) -> list[AgentEvent]:
        if props.get("field") != "text" or not self._is_assistant(props.get("messageID")):
            return []
        part_id, delta = props.get("partID"), props.get("delta")
        if not part_id or not isinstance(delta, str) or not delta:
            return []
        kind = self.part_types.get(part_id, "text")
        if kind not in ("text", "reasoning"):
            return []
        self.streamed[part_id] = self.streamed.get(part_id, "") + delta
        return [AgentEvent("text" if kind == "text" else "thinking", delta)]

    def _part(self, part: JSON) -> list[AgentEvent]:
        part_id, kind = part.get("id"), part.get("type")
        if not part_id or not kind or not self._is_assistant(part.get("messageID")):
            return []
        self.part_types[part_id] = kind
        if kind == "text" and isinstance(part.get("text"), str) and not part.get("synthetic"):
            self.final_texts.setdefault(str(part.get("messageID")), {})[part_id] = part["text"]
        if kind in ("text", "reasoning"):
            return self._text_part(part_id, kind, part)
        if kind == "tool":
            return self._tool_part(part_id, part)
        if kind == "step-finish":
            tokens = part.get("tokens") or {}
            self.prompt_tokens += int(tokens.get("input") or 0)
            self.completion_tokens += int(tokens.get("output") or 0) + int(tokens.get("reasoning") or 0)
            self.cost += float(part.get("cost") or 0.0)
        return []

    def _text_part(self, part_id: str, kind: str, part: JSON) -> list[AgentEvent]:
        # A finished part whose text was not (entirely) streamed as deltas: send the rest, so a
        # provider that sends whole texts at once is still reported. Only once finished, because
        # deltas may still be in flight before that.
        text = part.get("text")
        if not isinstance(text, str) or not (part.get("time") or {}).get("end"):
            return []
        sent = self.streamed.get(part_id, "")
        if len(text) <= len(sent) or not text.startswith(sent):
            return []
        self.streamed[part_id] = text
        return [AgentEvent("text" if kind == "text" else "thinking", text[len(sent) :])]

    def _tool_part(self, part_id: str, part: JSON) -> list[AgentEvent]:
        state = part.get("state") or {}
        status = state.get("status")
        out: list[AgentEvent] = []
        info = {"name": str(part.get("tool") or "tool"), "callID": str(part.get("callID") or part_id)}
        times = state.get("time") if isinstance(state.get("time"), dict) else {}
        # OpenCode's own times (ms since the epoch): the tool's real start and end for its span.
        started = times["start"] / 1000 if isinstance(times.get("start"), int | float) else None
        ended = times["end"] / 1000 if isinstance(times.get("end"), int | float) else None
        if status in ("running", "completed", "error") and part_id not in self.started_tools:
            self.started_tools.add(part_id)
            self.tool_calls += 1
            args = state.get("input") if isinstance(state.get("input"), dict) else None
            out.append(AgentEvent("tool_start", tool=ToolInfo(**info, args=args), started_at=started))
        if status in ("completed", "error") and part_id not in self.ended_tools:
            self.ended_tools.add(part_id)
            failed = status == "error"
            output = state.get("error") if failed else state.get("output")
            duration = None
            if started is not None and ended is not None:
                duration = max(0, int(times["end"] - times["start"]))
            out.append(
                AgentEvent(
                    "tool_end",
                    tool=ToolInfo(
                        **info,
                        output=None if output is None else str(output),
                        duration=duration,
                        error=failed,
                    ),
                    started_at=started,
                    ended_at=ended,
                )
            )
            if not failed and info["name"] in EDIT_TOOLS:
                self._file_edited((state.get("metadata") or {}).get("filepath"))
        return out

    def outcome(self) -> RunOutcome | None:
        """The outcome as the event stream told it, when the run ended cleanly; ``None`` when the
        history must be read instead (errors, aborts, anything the stream may not have shown).

        Saves a ``GET /session/{id}/message`` (the whole history) at the end of every normal run.
        ``message_count`` stays 0: the caller keeps its own count.
        """
        if self.lossy or self.error is not None or not self.assistant_infos:
            return None
        last = list(self.assistant_infos.values())[-1]
        if last.get("error") or not (last.get("time") or {}).get("completed"):
            return None
        text = "".join(self.final_texts.get(str(last.get("id")), {}).values()).strip()
        return RunOutcome(
            text=text,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cost=self.cost,
            tool_calls=self.tool_calls,
            files_edited=list(self.files_edited),
        )

    def _file_edited(self, path: Any) -> None:
        if isinstance(path, str) and path and path not in self.files_edited:
            self.files_edited.append(path)


def outcome_from_messages(
    messages: list[JSON], user_message_id: str | None, *, directory: str | None = None
) -> RunOutcome:
    """Build the outcome of the run started by ``user_message_id`` from the session history.

    The run's assistant messages are those after our user message (the last user message when the
    id is unknown). Final text = text parts of the last assistant message; tokens, cost and tool
    calls are summed over the run; ``message_count`` counts the user messages (exchanges).
    """
    outcome = RunOutcome()
    outcome.message_count = sum(1 for m in messages if _info(m).get("role") == "user")
    start = None
    for index, message in enumerate(messages):
        info = _info(message)
        if info.get("role") != "user":
            continue
        if user_message_id is None or info.get("id") == user_message_id:
            start = index
    if start is None:
        return outcome
    run = [m for m in messages[start + 1 :] if _info(m).get("role") == "assistant"]
    for message in run:
        info = _info(message)
        tokens = info.get("tokens") or {}
        outcome.prompt_tokens += int(tokens.get("input") or 0)
        outcome.completion_tokens += int(tokens.get("output") or 0) + int(tokens.get("reasoning") or 0)
        outcome.cost += float(info.get("cost") or 0.0)
        for part in message.get("parts") or []:
            if part.get("type") != "tool":
                continue
            outcome.tool_calls += 1
            state = part.get("state") or {}
            if part.get("tool") in EDIT_TOOLS and state.get("status") == "completed":
                path = (state.get("metadata") or {}).get("filepath") or (state.get("input") or {}).get("filePath")
                if isinstance(path, str) and path:
                    if directory and not os.path.isabs(path):
                        path = os.path.join(directory, path)
                    if path not in outcome.files_edited:
                        outcome.files_edited.append(path)
    if run:
        last = run[-1]
        outcome.text = "".join(
            p.get("text") or ""
            for p in last.get("parts") or []
            if p.get("type") == "text" and not p.get("synthetic") and not p.get("ignored")
        ).strip()
        errors = [_info(m)["error"] for m in run if isinstance(_info(m).get("error"), dict)]
        if errors:
            error = errors[-1]
            if error.get("name") == ABORTED_ERROR:
                outcome.aborted = True
            else:
                outcome.error, outcome.error_type = describe_error(error)
    return outcome


def run_finished(messages: list[JSON], user_message_id: str | None) -> bool:
    """Whether the history shows the run as over: the last assistant message after our user
    message is completed or failed. (On abort, ``session.idle`` is sent *before* the message gets
    its ``MessageAbortedError``, so the history can lag the idle event by a moment.)"""
    seen_user = user_message_id is None
    last: JSON | None = None
    for message in messages:
        info = _info(message)
        if info.get("id") == user_message_id:
            seen_user = True
        elif seen_user and info.get("role") == "assistant":
            last = info
    if last is None:
        return False
    return bool((last.get("time") or {}).get("completed") or last.get("error"))


def earlier_prompt(messages: list[JSON], part_id: str) -> tuple[str, bool] | None:
    """The user message in ``messages`` (a session history) that holds part ``part_id``, and
    whether its run can be carried on: only when it is the last exchange (a later prompt moved the
    session on) and did not end in an abort or an error (OpenCode does not answer such an exchange
    again)."""
    for index, message in enumerate(messages):
        info = _info(message)
        if info.get("role") != "user" or not any(p.get("id") == part_id for p in message.get("parts") or ()):
            continue
        later = [_info(m) for m in messages[index + 1:]]
        resumable = not any(i.get("role") == "user" or isinstance(i.get("error"), dict) for i in later)
        return str(info.get("id")), resumable
    return None


def _info(message: JSON) -> JSON:
    info = message.get("info")
    return info if isinstance(info, dict) else {}
