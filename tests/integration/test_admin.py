"""``ocbridge init`` and ``ocbridge doctor`` run as an operator runs them, against a real nats-server.

``init`` with user/password auth (as the image runs it on start), idempotent, fixing what NATS
lets it fix and failing on what it cannot, and the reason it exists: a Station that publishes
before any sidecar ever ran loses nothing. ``doctor`` all ok on a good setup, failing on a bad one,
never printing a credential (canary values that must not appear anywhere in its output).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import yaml
from nats.js import api

from ocbridge.bridge import Sidecar
from ocbridge.bridge.engines.scripted import ScriptedEngine
from ocbridge.bridge.jetstream.natsd import free_port
from ocbridge.bridge.processes import find_binary
from ocbridge.client.protocol import Naming, TaskResult
from support.operator import naming_env, ocbridge
from support.stack import ROOT, sidecar_config, unique_naming

USER = "ocbridge-admin"
CANARY = "canary-Pw-7f3a9c1e"  # the NATS password: must never be printed
GIT_CANARY = "ghp_canaryGitToken0123456789abcdef"


class AuthNats:
    """A nats-server with JetStream that requires user/password auth (child process, reaped)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            find_binary("nats-server"), "--jetstream", "--store_dir", str(self.tmp / "js"), "--addr", "127.0.0.1",
            "--port", str(self.port), "--user", USER, "--pass", CANARY,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:
            try:
                nc = await nats.connect(self.url, user=USER, password=CANARY, connect_timeout=1,
                                        allow_reconnect=False, max_reconnect_attempts=1, error_cb=_quiet)
                await nc.close()
                return
            except Exception:
                if loop.time() > deadline or self.proc.returncode is not None:
                    raise
                await asyncio.sleep(0.1)

    async def connect(self) -> nats.NATS:
        return await nats.connect(self.url, user=USER, password=CANARY)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def _quiet(exc: Exception) -> None:
    """Connection refused while the server starts: expected."""


@pytest.fixture
async def auth_nats(tmp_path) -> AsyncIterator[AuthNats]:
    server = AuthNats(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def operator_env(naming: Naming, url: str, **extra: str) -> dict[str, str]:
    """How the image runs the operator commands: everything from ``OCBRIDGE_*`` variables."""
    return {**naming_env(naming), "OCBRIDGE_NATS_URL": url, "OCBRIDGE_NATS_USER": USER,
            "OCBRIDGE_NATS_PASSWORD": CANARY, **extra}


def words(output: str) -> dict[str, str]:
    """``{object: word}`` of init's lines (``created  stream X  detail``)."""
    found = {}
    for line in output.splitlines():
        word, *rest = line.split()
        size = 3 if rest[:2] == ["object", "store"] else 2
        found[" ".join(rest[:size])] = word
    return found


async def test_init_is_idempotent_and_a_task_published_before_any_sidecar_runs(auth_nats, tmp_path):
    naming = unique_naming()
    env = operator_env(naming, auth_nats.url)
    code, out, err = await ocbridge("init", env=env)
    assert code == 0, out + err
    first = words(out)
    assert set(first.values()) == {"created"}
    assert {f"stream {naming.stream_name}", f"stream {naming.dead_letter_stream}", f"stream {naming.results_stream}",
            f"consumer {naming.consumer_name}", f"bucket {naming.sessions_bucket}", f"bucket {naming.state_bucket}",
            f"bucket {naming.tasks_bucket}", f"bucket {naming.leases_bucket}", f"bucket {naming.sidecars_bucket}",
            f"object store {naming.object_store}"} == set(first)
    code, again, err = await ocbridge("init", env=env)
    assert code == 0, again + err
    assert words(again) == dict.fromkeys(first, "ok")
    assert CANARY not in out + err + again

    # Station's way: a plain core-NATS publish, no sidecar has ever run. The stream keeps it.
    nc = await auth_nats.connect()
    try:
        task_id = uuid.uuid4().hex
        results: asyncio.Queue[TaskResult] = asyncio.Queue()

        async def on_result(msg) -> None:
            results.put_nowait(TaskResult.from_wire(msg.data))

        await nc.subscribe(naming.result_subject(task_id), cb=on_result)
        body = {"taskID": task_id, "prompt": "hello", "session": {"name": "early"}, "workspace": {"name": "early"},
                "callback": {"streamSubject": naming.stream_subject(task_id),
                             "resultSubject": naming.result_subject(task_id)}}
        await nc.publish(naming.task_subject, json.dumps(body).encode())
        await nc.flush()

        config = sidecar_config(auth_nats.url, tmp_path, naming, nats={"url": auth_nats.url, "user": USER,
                                                                        "password": CANARY})
        engine = ScriptedEngine(["ran after all"])
        sidecar = Sidecar(config, engine=engine)
        await sidecar.start()
        try:
            result = await asyncio.wait_for(results.get(), 30)
        finally:
            await sidecar.stop(grace=2)
        assert result.task_id == task_id and result.ok and result.result == "ran after all"
        assert [r.prompt for r in engine.requests] == ["hello"]
    finally:
        await nc.close()


async def test_init_fixes_what_nats_can_change_and_fails_on_what_it_cannot(auth_nats):
    naming = unique_naming()
    env = operator_env(naming, auth_nats.url)
    code, out, err = await ocbridge("init", env={**env, "OCBRIDGE_JETSTREAM__ACK_WAIT": "10"})
    assert code == 0, out + err
    code, out, err = await ocbridge("init", env={**env, "OCBRIDGE_JETSTREAM__ACK_WAIT": "20",
                                                 "OCBRIDGE_OBSERVABILITY__HEARTBEAT_TTL": "4"})
    assert code == 0, out + err
    lines = {" ".join(line.split()[1:3]): line for line in out.splitlines()}
    assert words(out)[f"stream {naming.stream_name}"] == "ok"
    assert lines[f"consumer {naming.consumer_name}"].split()[0] == "updated"
    assert "ack_wait 10s -> 20s" in lines[f"consumer {naming.consumer_name}"]
    assert lines[f"bucket {naming.sidecars_bucket}"].split()[0] == "updated"
    assert "15s -> 4s" in lines[f"bucket {naming.sidecars_bucket}"]
    nc = await auth_nats.connect()
    try:
        js = nc.jetstream()
        assert (await js.consumer_info(naming.stream_name, naming.consumer_name)).config.ack_wait == 20
        assert (await js.stream_info(f"KV_{naming.sidecars_bucket}")).config.max_age == 4
        # A push consumer under the workers' name: no sidecar could use it, and init cannot reshape it.
        other = unique_naming()
        await js.add_stream(name=other.stream_name, subjects=[other.task_subject], storage=api.StorageType.FILE,
                            retention=api.RetentionPolicy.WORK_QUEUE)
        await js.add_consumer(other.stream_name, api.ConsumerConfig(
            durable_name=other.consumer_name, deliver_subject="somewhere.else", ack_policy=api.AckPolicy.EXPLICIT))
    finally:
        await nc.close()
    code, out, err = await ocbridge("init", env=operator_env(other, auth_nats.url))
    assert code == 1, out + err
    line = next(line for line in out.splitlines() if f"consumer {other.consumer_name}" in line)
    assert line.startswith("FAIL") and "push consumer" in line and "nats consumer rm" in line
    assert CANARY not in out + err


async def test_init_with_a_wrong_password_says_so_and_shows_no_secret(auth_nats):
    naming = unique_naming()
    code, out, err = await ocbridge("init", "--timeout", "3",
                                    env=operator_env(naming, auth_nats.url, OCBRIDGE_NATS_PASSWORD=CANARY + "x"))
    assert code == 2 and "Authorization Violation" in err
    assert CANARY not in out + err


async def test_doctor_is_all_ok_on_a_good_setup(auth_nats, tmp_path):
    if not (ROOT / ".tools/npm/node_modules/.bin/opencode").exists():
        pytest.fail("opencode is not installed: run scripts/setup")
    naming = unique_naming()
    env = operator_env(naming, auth_nats.url, OCBRIDGE_WORKSPACE_ROOT=str(tmp_path / "ws"),
                       OCBRIDGE_DATA_DIR=str(tmp_path / "data"), OCBRIDGE_OFFLINE_MODEL="true")
    code, out, err = await ocbridge("init", env=env)
    assert code == 0, out + err
    code, out, err = await ocbridge("doctor", env=env, timeout=120)
    assert code == 0, out + err
    checks = {line[9:40].strip(): line for line in out.splitlines()}
    assert all(line.startswith("ok ") for line in checks.values()), out
    for name in ("nats", "jetstream", "task stream", "consumer", "dead-letter stream", "opencode", "git",
                 "ripgrep", "workspace root", "data dir", "nats credentials", "git token", "model credentials",
                 f"bucket {naming.sidecars_bucket}", f"object store {naming.object_store}"):
        assert name in checks, (name, out)
    assert "1.18.33" in checks["opencode"]
    assert "user/password (env OCBRIDGE_NATS_PASSWORD)" in checks["nats credentials"]
    assert "0 failure(s)" in err and CANARY not in out + err


async def test_doctor_fails_on_a_bad_setup_and_prints_no_secret(tmp_path):
    port = free_port()
    env = {
        "OCBRIDGE_NATS_URL": f"nats://{USER}:{CANARY}@127.0.0.1:{port}",  # nobody listens there
        "OCBRIDGE_OPENCODE_BINARY": str(tmp_path / "no-such-opencode"),
        "OCBRIDGE_WORKSPACE_ROOT": "/proc/ocbridge-workspaces",  # nobody may create files there, root included
        "OCBRIDGE_DATA_DIR": str(tmp_path / "data"),
        "OCBRIDGE_GIT__TOKEN": GIT_CANARY,
        "OCBRIDGE_GIT__TOKEN_HOSTS": '["github.com"]',
    }
    code, out, err = await ocbridge("doctor", "--timeout", "3", env=env, timeout=120)
    assert code == 1, out + err
    checks = {line[9:40].strip(): line for line in out.splitlines()}
    assert checks["nats"].startswith("FAIL") and f"nats://***@127.0.0.1:{port}" in checks["nats"]
    assert checks["opencode"].startswith("FAIL") and "no-such-opencode" in checks["opencode"]
    assert checks["workspace root"].startswith("FAIL") and "not writable" in checks["workspace root"]
    assert checks["data dir"].startswith("ok")
    assert checks["git token"].startswith("ok") and "set (env OCBRIDGE_GIT__TOKEN)" in checks["git token"]
    assert "3 failure(s)" in err
    assert CANARY not in out + err and GIT_CANARY not in out + err


async def test_init_and_doctor_read_the_same_config_file_as_serve(tmp_path):
    """A config the sidecar would refuse is refused the same way, naming the key."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"jetstream": {"max_attempts": 0}}))
    for command in ("init", "doctor"):
        code, _, err = await ocbridge(command, "--config", str(bad))
        assert code == 2 and "jetstream.max_attempts" in err, err


async def test_client_commands_use_the_auth_variables_and_a_wrong_password_fails_clearly(auth_nats):
    """``ocbridge sessions`` (any client command) reads OCBRIDGE_NATS_USER/_PASSWORD as serve does;
    a wrong password ends the command with the server's reason instead of retrying for ever."""
    naming = unique_naming()
    await ocbridge("init", env=operator_env(naming, auth_nats.url))
    code, out, err = await ocbridge("sessions", env=operator_env(naming, auth_nats.url))
    assert code == 0, err
    code, out, err = await ocbridge("sessions", timeout=60,
                                    env=operator_env(naming, auth_nats.url, OCBRIDGE_NATS_PASSWORD=CANARY + "x"))
    assert code != 0 and "Authorization Violation" in err
    assert CANARY not in out + err
