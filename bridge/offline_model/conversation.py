"""A provider-neutral view of one model request, built by the OpenAI and Anthropic front ends.

The scripted model only needs a few facts from a request: the system text (for the working
directory), the user prompts, how many tool results came back since the last prompt, and which tools
are offered. Both wire formats are reduced to :class:`Conversation` so :mod:`.script` stays
independent of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Claude Code (and sometimes OpenCode) wrap harness context in these tags inside user messages.
_REMINDER = re.compile(r"<system-reminder>.*?</system-reminder>", re.DOTALL)
# OpenCode: "Working directory: /x"; Claude Code: "Primary working directory: /x".
_WORKDIR = re.compile(r"working directory:[ \t]*(/[^\n]*)", re.IGNORECASE)


@dataclass(slots=True)
class Message:
    """One message. OpenAI ``tool`` messages become ``user`` messages holding ``tool_results``."""

    role: str  # "user" | "assistant"
    texts: list[str] = field(default_factory=list)
    tool_results: list[str] = field(default_factory=list)
    tool_calls: int = 0

    @property
    def prompt(self) -> str:
        """The user's own words: text without harness reminders, '' for pure tool-result messages."""
        if self.role != "user" or self.tool_results:
            return ""
        return clean_prompt("\n".join(self.texts))


@dataclass(slots=True)
class ToolSpec:
    """A tool the client offers: its name and the argument names its JSON schema declares."""

    name: str
    properties: frozenset[str] = frozenset()


@dataclass(slots=True)
class Conversation:
    """Everything :func:`.script.respond` looks at."""

    system: str = ""
    messages: list[Message] = field(default_factory=list)
    tools: list[ToolSpec] = field(default_factory=list)

    def prompt_index(self) -> int | None:
        """Index of the last message that carries a real user prompt."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].prompt:
                return i
        return None

    def prompt(self) -> str:
        """The current prompt ('' when the conversation has none)."""
        i = self.prompt_index()
        return self.messages[i].prompt if i is not None else ""

    def earlier_prompts(self) -> list[str]:
        """Every user prompt before the current one, oldest first."""
        end = self.prompt_index()
        if end is None:
            return []
        return [m.prompt for m in self.messages[:end] if m.prompt]

    def results_since_prompt(self) -> list[str]:
        """Tool results returned after the current prompt, in order."""
        start = self.prompt_index()
        if start is None:
            return []
        return [r for m in self.messages[start + 1 :] for r in m.tool_results]

    def working_directory(self) -> str | None:
        """The agent's working directory as its system prompt states it."""
        match = _WORKDIR.search(self.system)
        return match.group(1).strip() if match else None

    def tool(self, name: str) -> ToolSpec | None:
        """The offered tool called ``name`` (case-insensitive)."""
        return next((t for t in self.tools if t.name.lower() == name.lower()), None)


def clean_prompt(text: str) -> str:
    """Strip harness reminders and the quotes ``opencode run`` puts around a prompt with spaces."""
    text = _REMINDER.sub("", text).strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return text


def flatten(content: object) -> str:
    """Text of a message/tool-result ``content``: a string or a list of ``{"type": "text"}`` blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [flatten(b.get("text", b.get("content", ""))) for b in content if isinstance(b, dict)]
        return "\n".join(p for p in parts if p)
    return ""
