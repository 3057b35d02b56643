"""``ocbridge``: one command, many subcommands.

Client commands (``run``, ``submit``, ``watch``, ``cancel``, ``sessions``, ``schema``) need only
this package; ``serve`` and ``offline-model`` load the sidecar (``opencode-bridge[bridge]``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence

from ocbridge.client.protocol import (
    FleetStatus,
    SessionState,
    SidecarHeartbeat,
    StreamEvent,
    Task,
    TaskRecord,
    TaskResult,
    TaskStatus,
    naming_from_env,
)

from . import _sidecar
from .client import CodingClient
from .connection import NatsOptions
from .fleet import status_command
from .handle import TaskNotFound
from .render import render_attempt, render_event, render_result

EXIT_CODES = {TaskStatus.COMPLETED: 0, TaskStatus.ERROR: 1, TaskStatus.TIMEOUT: 3, TaskStatus.CANCELLED: 4}
#: ``watch`` of a task that is neither queued nor recorded.
EXIT_NOT_FOUND = 5


def _nats_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats-url", default=os.environ.get("OCBRIDGE_NATS_URL", "nats://127.0.0.1:4222"),
        help="NATS server URL (env OCBRIDGE_NATS_URL)",
    )
    parser.add_argument("--creds", default=os.environ.get("OCBRIDGE_NATS_CREDS"), help="NATS credentials file")
    parser.add_argument(
        "--task-subject", help="task subject (other names: OCBRIDGE_NAMING__<FIELD> variables, as for serve)"
    )


def _task_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what the agent should do")
    parser.add_argument("--workspace", "-w", required=True, help="workspace name (under the sidecar's root)")
    parser.add_argument("--session", "-s", help="session name (continued when it exists)")
    parser.add_argument("--new-session", action="store_true", help="never continue an existing session")
    parser.add_argument("--model", help="provider/model")
    parser.add_argument("--agent", help="OpenCode agent, e.g. build")
    parser.add_argument("--timeout", type=float, help="task timeout in seconds")
    parser.add_argument("--repo", help="git URL to clone into the workspace")
    parser.add_argument("--branch", help="git branch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ocbridge", description="Run coding tasks on OpenCode over NATS.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the sidecar next to OpenCode")
    serve.add_argument("--config", help="YAML config file (env OCBRIDGE_CONFIG)")
    serve.add_argument("--nats-url", help="NATS URL; none starts an embedded nats-server (env OCBRIDGE_NATS_URL)")
    serve.add_argument("--workspace-root", help="folder holding all workspaces (env OCBRIDGE_WORKSPACE_ROOT)")
    serve.add_argument("--concurrency", type=int, help="tasks run at once (env OCBRIDGE_CONCURRENCY)")
    serve.add_argument(
        "--offline-model", action="store_true", default=None,
        help="start the offline scripted model and use it (env OCBRIDGE_OFFLINE_MODEL)",
    )
    serve.add_argument("--opencode-url", help="use a running opencode serve instead of starting one")
    serve.add_argument("--data-dir", help="private state folder (env OCBRIDGE_DATA_DIR)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING (env OCBRIDGE_LOG_LEVEL)")
    serve.add_argument("--log-format", choices=["auto", "text", "json"], help="env OCBRIDGE_LOG_FORMAT")
    serve.add_argument("--http-port", type=int,
                       help="serve /healthz, /readyz, /metrics on this port, 0 for a free one (env OCBRIDGE_HTTP_PORT)")

    model = sub.add_parser("offline-model", help="serve the offline scripted model", add_help=False)
    model.add_argument("args", nargs=argparse.REMAINDER)

    run = sub.add_parser("run", help="run a task and show its events live")
    _nats_args(run)
    _task_args(run)
    run.add_argument("--json", action="store_true", help="print events and result as NDJSON")

    submit = sub.add_parser("submit", help="publish a task and print its id")
    _nats_args(submit)
    _task_args(submit)

    watch = sub.add_parser(
        "watch", help="follow a task's events and result (exit code 5: no such task, or its record expired)"
    )
    _nats_args(watch)
    watch.add_argument("task_id")
    watch.add_argument("--json", action="store_true")
    watch.add_argument("--timeout", type=float, help="give up after this many seconds")

    cancel = sub.add_parser("cancel", help="cancel a queued or running task")
    _nats_args(cancel)
    cancel.add_argument("task_id")
    cancel.add_argument("--reason")

    sessions = sub.add_parser("sessions", help="list, show or delete sessions")
    _nats_args(sessions)
    sessions.add_argument("action", nargs="?", choices=["list", "get", "delete"], default="list")
    sessions.add_argument("name", nargs="?")
    sessions.add_argument("--json", action="store_true")

    sub.add_parser("schema", help="print the JSON Schemas of the protocol messages")

    status = sub.add_parser("status", help="show the sidecars, the queue and dead letters (exit 2: NATS unreachable)")
    _nats_args(status)
    status.add_argument("--json", action="store_true", help="print the fleet as one JSON object")
    status.add_argument("--timeout", type=float, default=10.0, help="give up after this many seconds (default 10)")
    for name, text in (("init", "create or check the stream, consumer, buckets and object store before any sidecar"),
                       ("doctor", "check NATS, JetStream objects, binaries, the workspace root and credentials")):
        admin = sub.add_parser(name, help=text)
        admin.add_argument("--config", help="the sidecar's YAML config file (env OCBRIDGE_CONFIG), as for serve")
        admin.add_argument("--nats-url", help="NATS URL (env OCBRIDGE_NATS_URL)")
        admin.add_argument("--timeout", type=float, default=10.0, help="seconds allowed for each step (default 10)")
        if name == "doctor":
            admin.add_argument("--workspace-root", help="folder holding all workspaces (env OCBRIDGE_WORKSPACE_ROOT)")
            admin.add_argument("--data-dir", help="private state folder (env OCBRIDGE_DATA_DIR)")

    mcp = sub.add_parser("mcp", help="serve Station's coding tools over MCP (stdio)")
    mcp.add_argument("--config", help="Station config.yaml (or just its coding: block); env STN_CONFIG")
    return parser


def _nats_options(args: argparse.Namespace, name: str) -> NatsOptions:
    """The NATS options of a client command: ``--nats-url``/``--creds``, and the sidecar's auth
    variables (``OCBRIDGE_NATS_USER``/``_PASSWORD``/``_TOKEN``), so that a command works where
    ``serve`` does (a container, compose)."""
    env = os.environ
    return NatsOptions(
        url=args.nats_url, creds_file=args.creds, name=name,
        user=env.get("OCBRIDGE_NATS_USER") or None, password=env.get("OCBRIDGE_NATS_PASSWORD") or None,
        token=env.get("OCBRIDGE_NATS_TOKEN") or None,
    )


async def _client(args: argparse.Namespace) -> CodingClient:
    options = _nats_options(args, "ocbridge-cli")
    naming = naming_from_env(os.environ)
    if args.task_subject:
        naming = naming.model_copy(update={"task_subject": args.task_subject})
    return await CodingClient.connect(options, naming=naming)


def _task_from_args(client: CodingClient, args: argparse.Namespace) -> Task:
    git = {"url": args.repo, "branch": args.branch} if args.repo else None
    return client.build_task(
        args.prompt, workspace=args.workspace, session=args.session, continue_session=not args.new_session,
        git=git, model=args.model, agent=args.agent, timeout=args.timeout,
    )


def _printer(as_json: bool) -> tuple[Callable[[StreamEvent], None], Callable[[TaskResult], None]]:
    """Printers of events and of the result; in text, a line marks a new attempt's events."""
    if as_json:
        def event_out(event: StreamEvent) -> None:
            print(json.dumps(event.to_dict()), flush=True)

        def result_out(result: TaskResult) -> None:
            print(json.dumps(result.to_dict()), flush=True)

        return event_out, result_out
    color = sys.stdout.isatty()
    shown = {"attempt": 1}

    def event_text(event: StreamEvent) -> None:
        if (event.attempt or 1) != shown["attempt"]:
            shown["attempt"] = event.attempt or 1
            print(render_attempt(shown["attempt"], color=color), flush=True)
        print(render_event(event, color=color), flush=True)

    return event_text, lambda result: print(render_result(result, color=color), flush=True)


async def _follow(client: CodingClient, handle, as_json: bool, timeout: float | None) -> int:
    event_out, result_out = _printer(as_json)
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    pending: set[asyncio.Future] = set()

    def on_sigint() -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        print("cancelling (Ctrl-C again to quit)...", file=sys.stderr)
        pending.add(asyncio.ensure_future(handle.cancel("interrupted from the command line")))

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        async for event in handle.events(timeout=timeout):
            event_out(event)
        result = await handle.result(timeout=5)
    except TimeoutError:
        within = f" within {timeout:g}s" if timeout is not None else ""
        print(f"no result for task {handle.task_id}{within}", file=sys.stderr)
        return 3
    except TaskNotFound as exc:
        print(f"ocbridge: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    finally:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)
        await handle.close()
    result_out(result)
    return EXIT_CODES.get(result.status, 1)


async def _run(args: argparse.Namespace) -> int:
    async with await _client(args) as client:
        task = _task_from_args(client, args)
        handle = await client.submit(task)
        if args.command == "submit":
            await handle.close()
            print(task.task_id)
            return 0
        # Wait a little longer than the task's own timeout: the sidecar reports the timeout itself.
        wait = args.timeout + 60 if args.timeout else None
        return await _follow(client, handle, args.json, wait)


async def _watch(args: argparse.Namespace) -> int:
    async with await _client(args) as client:
        try:
            handle = await client.watch(args.task_id)
        except TaskNotFound as exc:
            print(f"ocbridge: {exc}", file=sys.stderr)
            return EXIT_NOT_FOUND
        return await _follow(client, handle, args.json, args.timeout)


async def _cancel(args: argparse.Namespace) -> int:
    async with await _client(args) as client:
        await client.cancel(args.task_id, reason=args.reason)
        print(f"cancel requested for {args.task_id}")
        return 0


async def _sessions(args: argparse.Namespace) -> int:
    async with await _client(args) as client:
        if args.action == "list":
            sessions = await client.list_sessions()
            if args.json:
                print(json.dumps([s.to_dict() for s in sessions], indent=2))
            for s in [] if args.json else sessions:
                print(f"{s.session_name:30} {s.opencode_id:34} {s.message_count:4} msgs  {s.last_used}  "
                      f"{s.workspace_path}")
            return 0
        if not args.name:
            print(f"sessions {args.action} needs a session name", file=sys.stderr)
            return 2
        if args.action == "get":
            state = await client.get_session(args.name)
            if state is None:
                print(f"no session named {args.name!r}", file=sys.stderr)
                return 1
            print(json.dumps(state.to_dict(), indent=2))
            return 0
        deleted = await client.delete_session(args.name)
        print(f"deleted session {args.name!r}" if deleted else f"no session named {args.name!r}")
        return 0 if deleted else 1


async def _status(args: argparse.Namespace) -> int:
    options = _nats_options(args, "ocbridge-status")
    naming = naming_from_env(os.environ)
    if args.task_subject:
        naming = naming.model_copy(update={"task_subject": args.task_subject})
    return await status_command(options, naming, as_json=args.json, timeout=args.timeout)


def _schema() -> int:
    models = {m.__name__: m for m in (Task, StreamEvent, TaskResult, SessionState, TaskRecord, SidecarHeartbeat,
                                      FleetStatus)}
    schemas = {name: m.model_json_schema(by_alias=True) for name, m in models.items()}
    print(json.dumps(schemas, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv[:1] == ["offline-model"]:
            return _sidecar.offline_model(argv[1:])
        args = parser.parse_args(argv)
        if args.command == "serve":
            return _sidecar.serve(args)
        if args.command == "init":
            return _sidecar.init(args)
        if args.command == "doctor":
            return _sidecar.doctor(args)
    except _sidecar.SidecarUnavailable as exc:
        print(f"ocbridge: {exc}", file=sys.stderr)
        return 2
    if args.command == "schema":
        return _schema()
    if args.command == "mcp":
        from ocbridge.client.station.mcp_server import main as mcp_main

        return mcp_main(args)
    handlers = {"run": _run, "submit": _run, "watch": _watch, "cancel": _cancel, "sessions": _sessions,
                "status": _status}
    try:
        return asyncio.run(handlers[args.command](args))
    except ConnectionError as exc:
        print(f"ocbridge: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
