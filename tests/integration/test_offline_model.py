"""The offline scripted model: prompt parsing, wire formats, and the real OpenCode / Claude Code CLIs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ocbridge.bridge.offline_model import OfflineModelServer, claude_env, opencode_provider_config
from ocbridge.bridge.offline_model.conversation import Conversation, Message, ToolSpec
from ocbridge.bridge.offline_model.script import Reply, parse_prompt, respond, usage

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".tools" / "npm" / "node_modules" / ".bin"
VENV_BIN = ROOT / ".venv" / "bin"

OPENCODE_TOOLS = [
    ToolSpec("bash", frozenset({"command", "timeout", "workdir"})),
    ToolSpec("edit", frozenset({"filePath", "oldString", "newString", "replaceAll"})),
    ToolSpec("read", frozenset({"filePath", "offset", "limit"})),
    ToolSpec("write", frozenset({"content", "filePath"})),
]
CLAUDE_TOOLS = [
    ToolSpec("Bash", frozenset({"command", "timeout", "description"})),
    ToolSpec("Edit", frozenset({"file_path", "old_string", "new_string", "replace_all"})),
    ToolSpec("Read", frozenset({"file_path", "offset", "limit"})),
    ToolSpec("Write", frozenset({"file_path", "content"})),
]


def conv(prompt: str, *, results: tuple[str, ...] = (), tools=OPENCODE_TOOLS, history=()) -> Conversation:
    """A conversation as the front ends build it: optional history, the prompt, then tool results."""
    c = Conversation(system="<env>\n  Working directory: /ws\n</env>", tools=list(tools))
    for old in history:
        c.messages += [Message("user", texts=[old]), Message("assistant", texts=["ok"])]
    c.messages.append(Message("user", texts=[prompt]))
    for result in results:
        c.messages += [Message("assistant", tool_calls=1), Message("user", tool_results=[result])]
    return c


# --- script: parsing and planning --------------------------------------------------------------


def test_parse_prompt_commands_lines_and_semicolons() -> None:
    steps = parse_prompt(
        "Create a.txt with content x\\ny; edit a.txt replace x with z\n"
        "run echo a; echo b\nDELETE old.txt\nread a.txt\nthink hmm\nslow 1.5\nfail 503\nrecall"
    )
    assert [(s.kind, s.args) for s in steps] == [
        ("create", ("a.txt", "x\ny")),
        ("edit", ("a.txt", "x", "z")),
        ("run", ("echo a; echo b",)),  # ';' splits only before a command keyword
        ("delete", ("old.txt",)),
        ("read", ("a.txt",)),
        ("think", ("hmm",)),
        ("slow", ("1.5",)),
        ("fail", ("503",)),
        ("recall", ()),
    ]


def test_parse_prompt_free_text_and_malformed_commands() -> None:
    assert [(s.kind, s.args) for s in parse_prompt("what is 2+2?\nreally")] == [("text", ("what is 2+2?\nreally",))]
    kinds = [s.kind for s in parse_prompt("fail soon\ncreate x.txt\nrun ls")]
    assert kinds == ["text", "text", "run"]
    assert parse_prompt("create e.txt with content ")[0].args == ("e.txt", "")


def test_opencode_turns_write_then_summary() -> None:
    first = respond(conv('"create hello.txt with content Hello World"'))  # `opencode run` quotes it
    assert first.finish == "tool_calls" and not first.text
    (call,) = first.tool_calls
    assert (call.name, call.arguments) == ("write", {"filePath": "/ws/hello.txt", "content": "Hello World"})

    final = respond(conv("create hello.txt with content Hello World", results=("Wrote file successfully.",)))
    assert final.finish == "stop" and final.text == "Done. Wrote hello.txt."


def test_claude_tool_names_and_arguments() -> None:
    prompt = "create sub/a.txt with content A\nedit /abs/b.txt replace 1 with 2\ndelete c d.txt\nrun make"
    calls = [respond(conv(prompt, results=("r",) * i, tools=CLAUDE_TOOLS)).tool_calls[0] for i in range(4)]
    assert [c.name for c in calls] == ["Write", "Edit", "Bash", "Bash"]
    assert calls[0].arguments == {"file_path": "/ws/sub/a.txt", "content": "A"}
    assert calls[1].arguments == {"file_path": "/abs/b.txt", "old_string": "1", "new_string": "2"}
    assert calls[2].arguments == {"command": "rm -f '/ws/c d.txt'", "description": "Delete c d.txt"}
    assert calls[3].arguments["command"] == "make"
    assert len({c.id for c in calls}) == 4


def test_opencode_bash_has_no_description_argument() -> None:
    call = respond(conv("run ls")).tool_calls[0]
    assert call.arguments == {"command": "ls"}


def test_final_text_quotes_read_and_command_output() -> None:
    reply = respond(conv("read a.txt\nrun seq 20", results=("1: hello", "\n".join(map(str, range(1, 21))))))
    assert reply.text.startswith("Done. Read a.txt:\n1: hello\nRan `seq 20`:\n11\n")
    assert reply.text.endswith("\n20")


def test_failed_edit_is_reported_and_call_ids_take_a_nonce() -> None:
    reply = respond(conv("edit a.txt replace x with y", results=("Could not find oldString in the file.",)))
    assert reply.text == "Done. Could not edit a.txt: Could not find oldString in the file."
    ids = {respond(conv("run ls"), nonce=n).tool_calls[0].id for n in ("", "", "a", "b")}
    assert len(ids) == 3


def test_think_slow_fail_recall_and_plain_text() -> None:
    thought = respond(conv("think about it\ncreate a.txt with content A"))
    assert thought.reasoning == "about it" and thought.tool_calls

    slow = respond(conv("slow 1"))
    assert slow.slow == ["slow "] * 4 and slow.slow_delay == 0.25 and slow.full_text.startswith("slow ")

    assert respond(conv("fail 429")).error == (429, "scripted failure 429")
    failed_late = respond(conv("create a.txt with content A\nfail 500", results=("ok",)))
    assert failed_late.error is not None and failed_late.error[0] == 500

    recall = respond(conv("recall", history=("create a.txt with content A", "second")))
    assert recall.text == 'I remember: "create a.txt with content A", "second"'
    assert respond(conv("recall")).text == "I remember nothing."
    assert respond(conv("hello " * 30)).text == "OK: " + ("hello " * 30)[:80]


def test_claude_reminders_are_not_prompts() -> None:
    c = Conversation(system="Primary working directory: /w", tools=list(CLAUDE_TOOLS))
    c.messages = [
        Message("user", texts=["<system-reminder>\nbe nice\n</system-reminder>\n", "read x"]),
        Message("assistant", tool_calls=1),
        Message("user", texts=["<system-reminder>note</system-reminder>"], tool_results=["1\tX"]),
    ]
    assert c.prompt() == "read x" and c.working_directory() == "/w"
    assert respond(c).text == "Done. Read x:\n1\tX"


def test_tool_less_request_gets_a_title_and_missing_tools_are_reported() -> None:
    title = conv('"create hello.txt with content Hello World"', tools=[])
    assert respond(title).text == "create hello.txt with content Hello World"
    topic = conv("hi", tools=[])
    topic.system = "Reply with JSON: isNewTopic (boolean), title (string or null)"
    assert json.loads(respond(topic).text) == {"isNewTopic": False, "title": None}
    reply = respond(conv("read a.txt", tools=[ToolSpec("write")]))
    assert not reply.tool_calls and "does not offer" in reply.text


def test_usage_is_deterministic() -> None:
    assert usage(10, Reply(text="abcde")) == (3, 2)
    assert usage(0, Reply()) == (0, 1)


def test_configs() -> None:
    cfg = opencode_provider_config("http://127.0.0.1:9/v1/")
    provider = cfg["provider"]["offline"]
    assert provider["npm"] == "@ai-sdk/openai-compatible"
    assert provider["options"]["baseURL"] == "http://127.0.0.1:9/v1"
    assert provider["models"]["scripted"]["tool_call"] is True
    assert cfg["model"] == cfg["small_model"] == "offline/scripted"
    assert cfg["enabled_providers"] == ["offline"]
    env = claude_env("http://127.0.0.1:9")
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9"
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1" and env["ANTHROPIC_API_KEY"]


# --- wire formats -------------------------------------------------------------------------------


@pytest.fixture
async def model() -> AsyncIterator[OfflineModelServer]:
    async with OfflineModelServer() as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def sse(resp: aiohttp.ClientResponse) -> list[tuple[str | None, str]]:
    """``(event, data)`` frames of a server-sent event stream."""
    frames, event = [], None
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            frames.append((event, line[6:]))
            event = None
    return frames


def openai_body(prompt: str, **extra: Any) -> dict[str, Any]:
    tools = [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "parameters": {"properties": {key: {"type": "string"} for key in t.properties}},
            },
        }
        for t in OPENCODE_TOOLS
    ]
    messages = [{"role": "system", "content": "Working directory: /ws"}, {"role": "user", "content": prompt}]
    return {"model": "scripted", "messages": messages, "tools": tools, **extra}


def anthropic_body(prompt: str, **extra: Any) -> dict[str, Any]:
    tools = [
        {"name": t.name, "input_schema": {"properties": {key: {"type": "string"} for key in t.properties}}}
        for t in CLAUDE_TOOLS
    ]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": prompt}]},
        {"role": "system", "content": "Primary working directory: /ws"},
    ]
    return {"model": "claude-x", "max_tokens": 100, "messages": messages, "tools": tools, **extra}


async def test_openai_stream_tool_call(model: OfflineModelServer, http: aiohttp.ClientSession) -> None:
    body = openai_body("think first\ncreate a.txt with content A", stream=True, stream_options={"include_usage": True})
    async with http.post(f"{model.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        frames = await sse(resp)
    assert frames[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in frames[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "scripted" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "first"
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["id"] and calls[0]["function"]["name"] == "write" and calls[0]["type"] == "function"
    assert len(calls) > 2, "arguments arrive in fragments"
    arguments = json.loads("".join(tc["function"]["arguments"] for tc in calls))
    assert arguments == {"filePath": "/ws/a.txt", "content": "A"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert model.requests == [body]


async def test_openai_text_nonstream_models_and_errors(model: OfflineModelServer, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{model.url}/v1/chat/completions", json=openai_body("hi", stream=True)) as resp:
        chunks = [json.loads(d) for _, d in (await sse(resp))[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "OK: hi"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and "usage" not in chunks[-1]

    async with http.post(f"{model.url}/v1/chat/completions", json=openai_body("hi")) as resp:
        doc = await resp.json()
    assert doc["object"] == "chat.completion" and doc["choices"][0]["message"]["content"] == "OK: hi"
    assert doc["usage"]["total_tokens"] == doc["usage"]["prompt_tokens"] + doc["usage"]["completion_tokens"]

    for status, kind in ((400, "invalid_request_error"), (503, "server_error")):
        async with http.post(f"{model.url}/v1/chat/completions", json=openai_body(f"fail {status}")) as resp:
            assert resp.status == status
            assert (await resp.json())["error"]["type"] == kind

    async with http.get(f"{model.url}/v1/models") as resp:
        assert (await resp.json())["data"][0]["id"] == "scripted"


async def test_anthropic_stream_thinking_and_tool_use(model: OfflineModelServer, http: aiohttp.ClientSession) -> None:
    body = anthropic_body("think hmm\nrun ls", stream=True)
    async with http.post(f"{model.url}/v1/messages?beta=true", json=body) as resp:
        assert resp.status == 200 and resp.headers["request-id"]
        frames = await sse(resp)
    events = [(name, json.loads(data)) for name, data in frames]
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["role"] == "assistant" and start["usage"]["input_tokens"] > 0

    blocks = [d for n, d in events if n == "content_block_start"]
    assert [b["content_block"]["type"] for b in blocks] == ["thinking", "tool_use"]
    assert blocks[1]["content_block"]["name"] == "Bash" and blocks[1]["content_block"]["id"].startswith("toolu_")
    deltas = [d for n, d in events if n == "content_block_delta"]
    assert "".join(d["delta"].get("thinking", "") for d in deltas if d["index"] == 0) == "hmm"
    assert any(d["delta"]["type"] == "signature_delta" for d in deltas)
    arguments = "".join(d["delta"]["partial_json"] for d in deltas if d["index"] == 1)
    assert json.loads(arguments) == {"command": "ls", "description": "Run ls"}
    assert names.count("content_block_stop") == 2
    final = events[-2][1]
    assert final["delta"]["stop_reason"] == "tool_use" and final["usage"]["output_tokens"] >= 1


async def test_anthropic_nonstream_errors_and_probes(model: OfflineModelServer, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{model.url}/v1/messages", json=anthropic_body("hello")) as resp:
        doc = await resp.json()
    assert doc["type"] == "message" and doc["stop_reason"] == "end_turn"
    assert doc["content"] == [{"type": "text", "text": "OK: hello"}]

    for status, kind in ((400, "invalid_request_error"), (529, "overloaded_error"), (500, "api_error")):
        async with http.post(f"{model.url}/v1/messages", json=anthropic_body(f"fail {status}")) as resp:
            assert resp.status == status
            doc = await resp.json()
            assert doc["type"] == "error" and doc["error"]["type"] == kind and doc["error"]["message"]

    async with http.head(f"{model.url}/") as resp:
        assert resp.status == 200
    async with http.post(f"{model.url}/v1/messages/count_tokens", json=anthropic_body("x")) as resp:
        assert (await resp.json())["input_tokens"] > 0
    assert ("HEAD", "/") in model.calls


async def test_slow_stream_can_be_abandoned(model: OfflineModelServer, http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    async with http.post(f"{model.url}/v1/chat/completions", json=openai_body("slow 1", stream=True)) as resp:
        frames = await sse(resp)
    assert time.monotonic() - started >= 0.9
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for _, d in frames[:-1])
    assert text == "slow " * 4

    # Hang up after the first text delta of a 30 s reply; the server must stay healthy.
    async with http.post(f"{model.url}/v1/messages", json=anthropic_body("slow 30", stream=True)) as resp:
        async for raw in resp.content:
            if b"text_delta" in raw:
                break
        resp.close()
    async with http.post(f"{model.url}/v1/messages", json=anthropic_body("hi")) as resp:
        assert resp.status == 200


async def run_proc(*argv: str, cwd: Path, env: dict[str, str], timeout: float = 60) -> tuple[int, str, str]:
    """Run a process in its own process group; kill the group on timeout and always reap it."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:  # timed out or cancelled: kill the whole group, then reap
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_main_serves_until_sigterm(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ocbridge.bridge.offline_model", "--port", "0", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert line.startswith("offline model listening on http://127.0.0.1:")
        url = line.split()[-1]
        async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/models") as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- the real agents ------------------------------------------------------------------------------


def need(binary: str) -> str:
    path = BIN / binary
    if not path.exists():
        pytest.fail(f"{binary} not installed (run scripts/setup)")
    return str(path)


def base_env(home: Path) -> dict[str, str]:
    """A clean environment: nothing from the outer one that could reach a real provider."""
    return {"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(home), "LANG": "C.UTF-8"}


def opencode_env(tmp: Path, url: str) -> dict[str, str]:
    env = base_env(tmp / "home")
    for name in ("config", "data", "cache", "state"):
        env[f"XDG_{name.upper()}_HOME"] = str(tmp / name)
    plugin_dir = tmp / "config" / "opencode"
    (plugin_dir / "node_modules").mkdir(parents=True, exist_ok=True)  # no background `npm install` of the plugin
    (plugin_dir / "package.json").write_text("{}")
    config = opencode_provider_config(url) | {"permission": {"*": "allow", "question": "deny"}}
    env["OPENCODE_CONFIG_CONTENT"] = json.dumps(config)
    for switch in ("MODELS_FETCH", "AUTOUPDATE", "SHARE", "LSP_DOWNLOAD", "DEFAULT_PLUGINS", "CLAUDE_CODE"):
        env[f"OPENCODE_DISABLE_{switch}"] = "1"
    return env


async def opencode_run(tmp: Path, url: str, *args: str) -> list[dict[str, Any]]:
    workspace = tmp / "ws"
    workspace.mkdir(exist_ok=True)
    env = opencode_env(tmp, url)
    code, out, err = await run_proc(need("opencode"), "run", "--format", "json", *args, cwd=workspace, env=env)
    assert code == 0, err[-2000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.slow
async def test_real_opencode_writes_a_file(model: OfflineModelServer, tmp_path: Path) -> None:
    events = await opencode_run(tmp_path, model.url, "create hello.txt with content Hello World")
    assert (tmp_path / "ws" / "hello.txt").read_text() == "Hello World"
    tool = next(e for e in events if e["type"] == "tool_use")["part"]
    assert tool["tool"] == "write" and tool["state"]["status"] == "completed"
    finishes = [e["part"] for e in events if e["type"] == "step_finish"]
    assert [f["reason"] for f in finishes] == ["tool-calls", "stop"]
    assert all(f["tokens"]["input"] > 0 and f["tokens"]["output"] > 0 for f in finishes)
    assert [e["part"]["text"] for e in events if e["type"] == "text"] == ["Done. Wrote hello.txt."]
    # OpenCode asked for a title with no tools, then ran the two tool/final turns.
    assert sum(1 for body in model.requests if body and not body.get("tools")) == 1


@pytest.mark.slow
async def test_real_opencode_thinking_and_continue(model: OfflineModelServer, tmp_path: Path) -> None:
    events = await opencode_run(tmp_path, model.url, "--thinking", "think it over")
    assert [e["part"]["text"] for e in events if e["type"] == "reasoning"] == ["it over"]
    events = await opencode_run(tmp_path, model.url, "--continue", "recall")
    assert [e["part"]["text"] for e in events if e["type"] == "text"] == ['I remember: "think it over"']


def claude_args(prompt: str, *extra: str) -> list[str]:
    return [need("claude"), "-p", prompt, "--output-format", "stream-json", "--verbose", "--max-turns", "5",
            "--permission-mode", "acceptEdits", *extra]  # fmt: skip


async def claude_run(tmp: Path, url: str, prompt: str, *extra: str) -> tuple[int, list[dict[str, Any]]]:
    workspace = tmp / "ws"
    workspace.mkdir(exist_ok=True)
    env = base_env(tmp / "home") | claude_env(url) | {"CLAUDE_CONFIG_DIR": str(tmp / "home" / ".claude")}
    code, out, _ = await run_proc(*claude_args(prompt, *extra), cwd=workspace, env=env)
    return code, [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.slow
async def test_real_claude_writes_a_file_and_resumes(model: OfflineModelServer, tmp_path: Path) -> None:
    code, lines = await claude_run(tmp_path, model.url, "create hello.txt with content Hello World")
    assert code == 0
    assert (tmp_path / "ws" / "hello.txt").read_text() == "Hello World"
    tool_uses = [b for line in lines if line["type"] == "assistant" for b in line["message"]["content"]]
    assert {"type": "tool_use", "name": "Write"}.items() <= tool_uses[0].items()
    result = lines[-1]
    assert result["type"] == "result" and result["subtype"] == "success" and result["is_error"] is False
    assert result["result"] == "Done. Wrote hello.txt." and result["num_turns"] == 2
    assert result["usage"]["input_tokens"] > 0 and result["usage"]["output_tokens"] > 0

    code, lines = await claude_run(tmp_path, model.url, "recall", "--resume", result["session_id"])
    assert code == 0 and lines[-1]["result"] == 'I remember: "create hello.txt with content Hello World"'


@pytest.mark.slow
async def test_real_claude_api_error(model: OfflineModelServer, tmp_path: Path) -> None:
    code, lines = await claude_run(tmp_path, model.url, "fail 400")
    result = lines[-1]
    assert code == 1 and result["type"] == "result" and result["is_error"] is True
    assert result["api_error_status"] == 400 and "scripted failure 400" in result["result"]
