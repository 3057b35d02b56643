"""The scripted model's brain: turn a conversation into the next response. Pure logic, no I/O.

The last user prompt is a small script, one command per line (or ``;``-separated):

    create <path> with content <text>      write a file (``\\n`` in text means newline)
    edit <path> replace <old> with <new>   edit a file
    delete <path>                          ``rm -f`` through the bash tool
    run <command>                          the bash tool
    read <path>                            the read tool; the final text quotes its output
    think <text>                           reasoning before the reply
    slow <seconds>                         text streamed slowly for about that long
    fail <status>                          the HTTP request fails with that status
    recall                                 quote every earlier user prompt
    kv get <key> [in sessions]             Station's station_kv_get tool (MCP); the final text quotes
    kv set <key> <value> [in sessions]     ...the result; station_kv_set (the value may hold spaces)
    session info [<name>]                  station_session_info (default: the task's own session)
    tool <name> <json>                     the offered tool whose name ends with <name>, with those
                                           raw arguments (for tests of bad arguments)
    anything else                          a plain "OK: ..." answer

The Station tools are found by the end of their name, whatever prefix the client adds to MCP tools
(OpenCode ``<server>_station_kv_get``, Claude Code ``mcp__<server>__station_kv_get``).

Each tool command is one model turn; the number of tool results since the prompt says which turn is
next. Other commands attach to the turn of the next tool command, or to the final turn, which also
summarises what the tools did.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
import shlex
from dataclasses import dataclass, field

from .conversation import Conversation
from .tools import Action, ToolCall, bind

TOOL_COMMANDS = ("create", "edit", "delete", "run", "read", "kv_get", "kv_set", "session_info", "tool")
COMMANDS = ("create", "edit", "delete", "run", "read", "kv", "session", "tool", "think", "slow", "fail", "recall")
SLOW_TICK = 0.25  # seconds between deltas of a ``slow`` reply
_SPLIT = re.compile(rf";\s*(?=(?:{'|'.join(COMMANDS)})\b)", re.IGNORECASE)
_CREATE = re.compile(r"create\s+(\S+)\s+with\s+content(?:\s(.*))?", re.IGNORECASE | re.DOTALL)
_EDIT = re.compile(r"edit\s+(\S+)\s+replace\s+(.+?)\s+with\s(.*)", re.IGNORECASE | re.DOTALL)
_FILE_VERBS = {"create": ("Wrote", "Could not write"), "edit": ("Edited", "Could not edit")}
_ESCAPES = re.compile(r"\\([nt\\])")
_KV_GET = re.compile(r"kv\s+get\s+(\S+)(?:\s+in\s+(sessions|state))?", re.IGNORECASE)
_KV_SET = re.compile(r"kv\s+set\s+(\S+)\s(.*?)(?:\s+in\s+(sessions|state))?", re.IGNORECASE | re.DOTALL)
_SESSION_INFO = re.compile(r"session\s+info(?:\s+(\S+))?", re.IGNORECASE)
_TOOL = re.compile(r"tool\s+(\S+)\s+(\{.*\})", re.IGNORECASE | re.DOTALL)
#: The Station tool each command calls (by the end of its name).
STATION_TOOLS = {"kv_get": "station_kv_get", "kv_set": "station_kv_set", "session_info": "station_session_info"}


@dataclass(frozen=True, slots=True)
class Step:
    """One parsed command: ``kind`` is a command keyword or ``"text"``; ``args`` its operands."""

    kind: str
    args: tuple[str, ...] = ()

    @property
    def is_tool(self) -> bool:
        return self.kind in TOOL_COMMANDS


@dataclass(slots=True)
class Reply:
    """The next model response, before any wire format.

    ``slow`` holds text deltas to stream ``slow_delay`` seconds apart, before ``text``. ``error`` set
    means the HTTP request must fail with ``(status, message)`` instead.
    """

    reasoning: str = ""
    slow: list[str] = field(default_factory=list)
    slow_delay: float = 0.0
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    error: tuple[int, str] | None = None

    @property
    def full_text(self) -> str:
        return "".join(self.slow) + self.text

    @property
    def finish(self) -> str:
        """``"tool_calls"`` when the client must run tools and call back, else ``"stop"``."""
        return "tool_calls" if self.tool_calls else "stop"


def unescape(text: str) -> str:
    """Turn ``\\n``, ``\\t`` and ``\\\\`` written in a prompt into the characters they name."""
    return _ESCAPES.sub(lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def parse_step(line: str) -> Step:
    """Parse one command line; unknown or malformed commands become ``text`` steps."""
    line = line.strip()
    word, _, rest = line.partition(" ")
    word, rest = word.lower(), rest.strip()
    if word == "create" and (m := _CREATE.fullmatch(line)):
        return Step("create", (m.group(1), unescape(m.group(2) or "")))
    if word == "edit" and (m := _EDIT.fullmatch(line)):
        return Step("edit", (m.group(1), unescape(m.group(2)), unescape(m.group(3))))
    if word in ("delete", "run", "read", "think") and rest:
        return Step(word, (rest,))
    if word == "slow" and _is_number(rest):
        return Step("slow", (rest,))
    if word == "fail" and rest.isdigit() and 400 <= int(rest) <= 599:
        return Step("fail", (rest,))
    if word == "recall" and not rest:
        return Step("recall", ())
    if word == "kv" and (m := _KV_GET.fullmatch(line)):
        return Step("kv_get", (m.group(1), (m.group(2) or "").lower()))
    if word == "kv" and (m := _KV_SET.fullmatch(line)):
        return Step("kv_set", (m.group(1), unescape(m.group(2)), (m.group(3) or "").lower()))
    if word == "session" and (m := _SESSION_INFO.fullmatch(line)):
        return Step("session_info", (m.group(1) or "",))
    if word == "tool" and (m := _TOOL.fullmatch(line)):
        return Step("tool", (m.group(1), m.group(2)))
    return Step("text", (line,))


def parse_prompt(prompt: str) -> list[Step]:
    """Split a prompt into steps: one per line, and lines split at ``;`` before a command keyword.

    A prompt with no command at all is a single ``text`` step holding the whole prompt.
    """
    lines = [part for raw in prompt.splitlines() for part in _SPLIT.split(raw) if part.strip()]
    steps = [parse_step(line) for line in lines]
    if all(s.kind == "text" for s in steps):
        return [Step("text", (prompt.strip(),))] if prompt.strip() else []
    return steps


def split_turns(steps: list[Step]) -> list[list[Step]]:
    """Group steps into model turns: each turn ends with one tool step; the last has none."""
    turns: list[list[Step]] = [[]]
    for step in steps:
        turns[-1].append(step)
        if step.is_tool:
            turns.append([])
    return turns


#: What OpenCode gives a model as the result of a tool call its server died in.
INTERRUPTED = "[Tool execution was interrupted]"


def respond(conv: Conversation, nonce: str = "") -> Reply:
    """Decide the next response to ``conv``.

    ``nonce`` is mixed into tool call ids: the servers pass a random one so that concurrent sessions
    running the same prompt never share ids; tests leave it empty for reproducible ids.
    """
    if not conv.tools:
        return Reply(text=title_for(conv))
    steps = parse_prompt(conv.prompt())
    turns = split_turns(steps)
    tool_steps = [s for s in steps if s.is_tool]
    # A step whose tool was cut off (the client died while it ran) is made again, as a model
    # would; the later steps count only the results that came through.
    results = [r for r in conv.results_since_prompt() if r.strip() != INTERRUPTED]
    index = min(len(results), len(turns) - 1)
    turn = turns[index]
    reply = _plain_parts(turn, conv)
    if reply.error:
        return reply
    if index < len(turns) - 1:  # a tool turn: its last step is the tool command
        call = bind(plan_action(turn[-1], conv.working_directory()), conv, _call_id(conv, index, nonce))
        if call is None:
            reply.text += f"The {turn[-1].kind} command needs a tool this client does not offer."
        else:
            reply.tool_calls.append(call)
        return reply
    summary = summarize(tool_steps, results)
    reply.text = "\n".join(t for t in (reply.text, summary) if t)
    if not reply.text and not reply.slow:
        reply.text = f"OK: {conv.prompt()[:80]}"
    return reply


def _plain_parts(turn: list[Step], conv: Conversation) -> Reply:
    """The non-tool steps of a turn: reasoning, slow text, failure, recall and plain text."""
    reply = Reply()
    thoughts, texts = [], []
    for step in turn:
        if step.kind == "think":
            thoughts.append(step.args[0])
        elif step.kind == "fail":
            status = int(step.args[0])
            reply.error = (status, f"scripted failure {status}")
            return reply
        elif step.kind == "slow":
            ticks = max(1, round(float(step.args[0]) / SLOW_TICK))
            reply.slow, reply.slow_delay = ["slow "] * ticks, SLOW_TICK
        elif step.kind == "recall":
            earlier = conv.earlier_prompts()
            quoted = ", ".join(f'"{p}"' for p in earlier)
            texts.append(f"I remember: {quoted}" if earlier else "I remember nothing.")
        elif step.kind == "text":
            texts.append(f"OK: {step.args[0][:80]}")
    reply.reasoning = "\n".join(thoughts)
    reply.text = "\n".join(texts)
    return reply


def plan_action(step: Step, workdir: str | None) -> Action:
    """The abstract tool action for a tool step, with paths made absolute against ``workdir``."""

    def absolute(path: str) -> str:
        if path.startswith("/") or not workdir:
            return path
        return posixpath.normpath(posixpath.join(workdir, path))

    if step.kind == "create":
        return Action("write", {"path": absolute(step.args[0]), "content": step.args[1]})
    if step.kind == "edit":
        path, old, new = step.args
        return Action("edit", {"path": absolute(path), "old": old, "new": new})
    if step.kind == "delete":
        command = f"rm -f {shlex.quote(absolute(step.args[0]))}"
        return Action("bash", {"command": command, "description": f"Delete {step.args[0]}"})
    if step.kind == "run":
        return Action("bash", {"command": step.args[0], "description": f"Run {step.args[0][:40]}"})
    if step.kind == "read":
        return Action("read", {"path": absolute(step.args[0])})
    if step.kind == "kv_get":
        key, bucket = step.args
        return Action(STATION_TOOLS["kv_get"], {"key": key, **({"bucket": bucket} if bucket else {})}, by_suffix=True)
    if step.kind == "kv_set":
        key, value, bucket = step.args
        args = {"key": key, "value": value, **({"bucket": bucket} if bucket else {})}
        return Action(STATION_TOOLS["kv_set"], args, by_suffix=True)
    if step.kind == "session_info":
        return Action(STATION_TOOLS["session_info"], {"sessionName": step.args[0]} if step.args[0] else {},
                      by_suffix=True)
    if step.kind == "tool":
        try:
            raw = json.loads(step.args[1])
        except ValueError:
            raw = {"_unparsed": step.args[1]}
        return Action(step.args[0], raw if isinstance(raw, dict) else {"_value": raw}, by_suffix=True)
    raise ValueError(f"not a tool step: {step.kind}")


def summarize(tool_steps: list[Step], results: list[str]) -> str:
    """The final text after tool turns: one sentence per tool, with read and command output."""
    if not tool_steps:
        return ""
    lines = []
    for step, result in zip(tool_steps, results, strict=False):
        operand = step.args[0]
        if step.kind in _FILE_VERBS:
            # Both clients' write/edit tools say "...successfully" on success and explain failures.
            ok, failed = _FILE_VERBS[step.kind]
            succeeded = "success" in result.lower()
            lines.append(f"{ok} {operand}." if succeeded else f"{failed} {operand}: {_tail(result)}")
        elif step.kind == "delete":
            lines.append(f"Deleted {operand}.")
        elif step.kind == "read":
            lines.append(f"Read {operand}:\n{result}")
        elif step.kind in STATION_TOOLS or step.kind == "tool":
            name = STATION_TOOLS.get(step.kind, operand)
            lines.append(f"Called {name}{f' {operand}' if step.kind in ('kv_get', 'kv_set') else ''}: "
                         f"{_tail(result)}")
        else:
            lines.append(f"Ran `{operand}`:\n{_tail(result)}")
    return "Done. " + "\n".join(lines)


def title_for(conv: Conversation) -> str:
    """A short title for tool-less side requests (OpenCode's session title, Claude Code's checks)."""
    if "isNewTopic" in conv.system:  # Claude Code's interactive topic check wants this JSON
        return '{"isNewTopic": false, "title": null}'
    texts = [m.prompt for m in conv.messages if m.prompt]
    line = (texts[-1] if texts else "").strip().splitlines()
    return (line[0][:50].strip() if line else "") or "Scripted session"


def usage(prompt_chars: int, reply: Reply) -> tuple[int, int]:
    """Deterministic ``(input_tokens, output_tokens)``: about four characters per token."""
    out = len(reply.reasoning) + len(reply.full_text)
    out += sum(len(c.name) + len(c.arguments_json) for c in reply.tool_calls)
    return math.ceil(prompt_chars / 4), max(1, math.ceil(out / 4))


def _tail(output: str, lines: int = 10, chars: int = 1000) -> str:
    return "\n".join(output.rstrip().splitlines()[-lines:])[-chars:]


def _is_number(text: str) -> bool:
    try:
        return 0 <= float(text) < 3600
    except ValueError:
        return False


def _call_id(conv: Conversation, turn: int, nonce: str) -> str:
    """Unique within a conversation even without a nonce (the message count only grows)."""
    seed = f"{nonce}:{len(conv.messages)}:{turn}:{conv.prompt()}"
    return hashlib.sha256(seed.encode()).hexdigest()[:24]
