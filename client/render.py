"""Human-readable rendering of events and results for the command line."""

from __future__ import annotations

import json
import re

from ocbridge.client.protocol import StreamEvent, TaskResult, TaskStatus

_COLORS = {"dim": "2", "bold": "1", "red": "31", "green": "32", "yellow": "33", "blue": "34", "cyan": "36"}


def _c(text: str, color: str, enabled: bool) -> str:
    return f"\033[{_COLORS[color]}m{text}\033[0m" if enabled else text


#: Control characters (C0 but newline, DEL, C1): a terminal would act on them (colours, cursor
#: moves, a window title), and what is printed comes from the network.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with every control character but newline shown as an escape (``\\x1b``)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _short(value: object, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = printable(text.replace("\n", "⏎ "))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_event(event: StreamEvent, *, color: bool = False) -> str:
    """One line per event, e.g. ``[  5] ▶ write {"filePath": ...}``."""
    head = _c(f"[{event.seq:3}]", "dim", color)
    kind = event.type
    if kind in ("text", "thinking"):
        style = "bold" if kind == "text" else "dim"
        return f"{head} {_c(kind + ':', style, color)} {_short(event.content or '', 400)}"
    if kind == "tool_start" and event.tool:
        return f"{head} {_c('▶ ' + event.tool.name, 'cyan', color)} {_short(event.tool.args or {})}"
    if kind == "tool_end" and event.tool:
        mark, style = ("✗", "red") if event.tool.error else ("✓", "green")
        took = f" ({event.tool.duration} ms)" if event.tool.duration is not None else ""
        return f"{head} {_c(f'{mark} {event.tool.name}{took}', style, color)} {_short(event.tool.output or '')}"
    if kind == "error":
        return f"{head} {_c('error:', 'red', color)} {printable(event.content or '')}"
    detail = event.content or ""
    if event.session:
        detail = f"{event.session.name} ({event.session.opencode_id})"
    if event.git:
        detail = " ".join(str(v) for v in (event.git.url, event.git.branch, event.git.commit) if v)
    return f"{head} {_c(kind, 'blue', color)} {_short(detail)}"


def render_attempt(attempt: int, *, color: bool = False) -> str:
    """The line shown before the events of a task's new attempt (they start again at seq 1)."""
    return _c(f"── attempt {attempt}: the task was given back and runs again; its events start over", "yellow", color)


def render_result(result: TaskResult, *, color: bool = False) -> str:
    style = "green" if result.status == TaskStatus.COMPLETED else "red"
    m = result.metrics
    lines = [
        _c(f"── {result.status.value} ", style, color) + f"in {m.duration / 1000:.1f}s, "
        f"{m.prompt_tokens} prompt + {m.completion_tokens} completion tokens, {m.tool_calls} tool calls, "
        f"{m.stream_events} events" + (f", cost ${m.cost:.4f}" if m.cost else ""),
    ]
    if result.session:
        lines.append(f"session {result.session.name} ({result.session.opencode_id}), "
                     f"{result.session.message_count or 0} exchange(s)")
    if result.workspace and result.workspace.path:
        git = result.workspace.git
        where = f" on {git.branch} at {(git.commit or '')[:10]}{' (dirty)' if git.dirty else ''}" if git else ""
        lines.append(f"workspace {result.workspace.path}{where}")
    for change in result.changes or []:
        counts = f" +{change.insertions} -{change.deletions}" if change.insertions is not None else ""
        lines.append(f"  {change.status:8} {change.path}{counts}")
    for name, target in (result.spilled or {}).items():
        # Left listed by the client only when the object could not be read back.
        lines.append(_c(f"{name}: not available (object {target} could not be read from the object store)",
                        "yellow", color))
    if result.error:
        lines.append(_c(f"error ({result.error_type}): {result.error}", "red", color))
    elif result.result:
        lines.append(result.result)
    return "\n".join(lines)
