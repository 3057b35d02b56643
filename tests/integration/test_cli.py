"""The ``ocbridge`` command line, run as a user would."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.opencode, pytest.mark.slow]

OCBRIDGE = str(Path(sys.executable).parent / "ocbridge")


async def ocbridge(stack, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    sidecar, client = stack
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCBRIDGE_")}
    env["OCBRIDGE_NATS_URL"] = sidecar.nats_url
    for field, value in client.naming.model_dump().items():
        if value is not None:
            env[f"OCBRIDGE_NAMING__{field.upper()}"] = value
    proc = await asyncio.create_subprocess_exec(
        OCBRIDGE, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def test_run_shows_events_and_result_and_exits_zero(stack):
    done = await ocbridge(stack, "run", "create cli.txt with content from the cli", "--workspace", "cli-ws",
                          "--session", "cli-s")
    assert done.returncode == 0, done.stderr
    assert "▶ write" in done.stdout and "✓ write" in done.stdout
    assert "completed" in done.stdout and "prompt +" in done.stdout
    assert (Path(stack[0].config.workspace_root).resolve() / "cli-ws" / "cli.txt").read_text() == "from the cli"


async def test_run_json_is_ndjson_ending_with_the_result(stack):
    done = await ocbridge(stack, "run", "hello", "--workspace", "cli-json", "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["seq"] for line in lines[:-1]] == list(range(1, len(lines)))
    assert lines[-1]["status"] == "completed" and lines[-1]["metrics"]["streamEvents"] == len(lines) - 1


async def test_failed_and_timed_out_tasks_exit_non_zero(stack):
    failed = await ocbridge(stack, "run", "fail 400", "--workspace", "cli-fail")
    assert failed.returncode == 1 and "provider_error" in failed.stdout
    timed_out = await ocbridge(stack, "run", "slow 20", "--workspace", "cli-slow", "--timeout", "1")
    assert timed_out.returncode == 3 and "timeout" in timed_out.stdout


async def test_submit_watch_and_sessions(stack):
    submitted = await ocbridge(stack, "submit", "create w.txt with content w", "--workspace", "cli-w",
                               "--session", "cli-watch")
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    watched = await ocbridge(stack, "watch", task_id, "--json", "--timeout", "60")
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout.splitlines()[-1])["taskID"] == task_id
    # Watching a finished task prints its recorded result at once.
    again = await ocbridge(stack, "watch", task_id, "--json", "--timeout", "10")
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1])["status"] == "completed"

    listed = await ocbridge(stack, "sessions", "list", "--json")
    assert "cli-watch" in [s["sessionName"] for s in json.loads(listed.stdout)]
    got = await ocbridge(stack, "sessions", "get", "cli-watch")
    assert json.loads(got.stdout)["opencodeID"].startswith("ses_")
    deleted = await ocbridge(stack, "sessions", "delete", "cli-watch")
    assert deleted.returncode == 0
    missing = await ocbridge(stack, "sessions", "get", "cli-watch")
    assert missing.returncode == 1 and "no session" in missing.stderr


async def test_watching_an_unknown_task_says_so_at_once(stack):
    done = await ocbridge(stack, "watch", "no-such-task", "--timeout", "60", timeout=30)
    assert done.returncode == 5, done.stderr
    assert "task no-such-task not found" in done.stderr and "record expired" in done.stderr


async def test_cancel_from_the_command_line(stack):
    _, client = stack
    handle = await client.submit("slow 30", workspace="cli-cancel")
    async for event in handle.events(timeout=60):
        if event.type == "prompt_sent":
            break
    done = await ocbridge(stack, "cancel", handle.task_id)
    assert done.returncode == 0
    assert (await handle.result(timeout=30)).status == "cancelled"


def test_schema_prints_the_protocol_models():
    done = subprocess.run([OCBRIDGE, "schema"], capture_output=True, text=True, timeout=30, check=True)
    schemas = json.loads(done.stdout)
    assert {"Task", "StreamEvent", "TaskResult", "SessionState"} <= set(schemas)
    assert "taskID" in schemas["Task"]["properties"] and "callback" in schemas["Task"]["required"]


def test_serve_rejects_a_bad_config_with_the_key_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("concurrency: 0\n")
    done = subprocess.run([OCBRIDGE, "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "concurrency" in done.stderr


def test_serve_http_port_flag_serves_health_and_metrics(tmp_path):
    """``ocbridge serve --http-port 0 --log-format text`` logs where it listens before NATS is
    reached: /healthz answers, /readyz says NATS is missing (nothing listens on port 1), and SIGTERM
    stops it while it still waits for NATS."""
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [OCBRIDGE, "serve", "--http-port", "0", "--log-format", "text", "--nats-url", "nats://127.0.0.1:1",
             "--workspace-root", str(tmp_path / "ws"), "--data-dir", str(tmp_path / "data")],
            stderr=log_file, stdout=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 60
        url = None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"(http://127\.0\.0\.1:\d+) \(/healthz", log_path.read_text(errors="replace"))
            url = found.group(1) if found else None
            time.sleep(0.1)
        assert url, log_path.read_text(errors="replace")
        with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
            assert response.status == 200
        try:  # NATS at port 1 is unreachable: not ready, and it says why
            urllib.request.urlopen(url + "/readyz", timeout=10)
            raise AssertionError("/readyz answered 200 without NATS")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and "nats" in exc.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
