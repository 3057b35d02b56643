"""Property-based fuzzing of task bodies (Hypothesis) against one real sidecar on a real nats-server.

A task is hostile input. For every generated body published on the task subject:

- it ends in **exactly one** outcome: one result on its own result subject (``completed`` only for
  a valid task, and always for an untouched good one) or one dead letter, never both, never two,
  never an ``internal error``;
- **nothing is published outside the task's own subjects**: a tap on ``>`` sees every message of
  the example, and each must be the task itself, its own event/result subject, the dead letter, or
  the sidecar's own JetStream traffic: KV writes only to the keys this task's record, session,
  lease and workspace use, object store writes only under ``output/<taskID>/``, no stream or
  consumer deleted, purged or changed, and nothing at all on a subject the task named that is not
  its own;
- **nothing is written outside the workspace root**: a sibling folder (which symlinks in the root
  point at) is compared after every example, the whole pytest temporary tree at the end;
- the sidecar keeps serving: its fetch loop is alive after every example, and a good task
  completes after the run.

The agent is a :class:`ScriptedEngine` (it writes one file and answers), so an example takes
milliseconds; the workspace, git baseline, session lease, records and change report are the real
ones. Shrinking is off (phases) to keep the run bounded; a failure notes the body and what was seen.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import types
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

from ocbridge.bridge.engines.scripted import ScriptedEngine, WriteFile
from ocbridge.bridge.jetstream.natsd import EmbeddedNats
from ocbridge.bridge.jetstream.worker import TASK_LEASE_PREFIX
from ocbridge.bridge.sidecar import Sidecar
from ocbridge.client.protocol import Naming, Task, TaskResult, cancel_key, kv_key, kv_name, record_key
from ocbridge.client.protocol.body import MAX_DEPTH, nesting_depth
from support.faults import wait_until
from support.stack import sidecar_config, unique_naming

pytestmark = pytest.mark.slow

MAX_TASK_BYTES = 4096  # small, so that "too large" is reached by small examples
WORKSPACE_RECORD = "ocbridge.workspace."  # the janitor's key prefix in the state bucket


# ------------------------------------------------------------------------------------ the stack


class Fuzz:
    """The module's sidecar, its NATS connection, the tap on ``>`` and the file-system snapshots."""

    def __init__(self, naming: Naming, base: Path, root: Path, outside: Path, sidecar: Sidecar, nc: nats.NATS,
                 errors: list[str], before: dict[str, tuple]) -> None:
        self.naming, self.base, self.root, self.outside = naming, base, root, outside
        self.sidecar, self.nc, self.errors, self.before = sidecar, nc, errors, before
        self.outside_before = tree(outside)
        self.tap: list[tuple[str, bytes, dict[str, str]]] = []
        self.examples = 0

    def __repr__(self) -> str:
        return f"Fuzz(sidecar on {self.sidecar.nats_url}, {len(self.tap)} messages tapped)"

    @property
    def js(self):
        return self.nc.jetstream()


def tree(path: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every entry under ``path`` (links not followed): kind, size, mtime, link target."""
    out: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(path):
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for name in dirs + files:
            entry = here / name
            info = entry.lstat()
            target = os.readlink(entry) if entry.is_symlink() else None
            out[str(entry)] = (info.st_mode, info.st_size if not entry.is_dir() else 0, info.st_mtime_ns, target)
    return out


#: Absolute places the name pool mentions literally (re-rooted under the root when used correctly).
LITERAL_TARGETS = [Path("/tmp/x"), Path.home() / "x", Path("/x")]


def outside_the_root(base: Path, root: Path, basetemp: Path) -> dict[str, Any]:
    """What a task must never change: the module's folder but the root, the NATS store and the
    sidecar's data dir, in which only the folder of kept baselines may appear (empty once every
    task has its result: a scripted sidecar makes nothing else there), the entries of pytest's
    temporary root, and the absolute places the name pool spells out."""
    data = base / "data"
    return {
        "module": tree(base, (root, base / "nats", data)),
        "data": sorted(str(p.relative_to(data)) for p in data.rglob("*") if p != data / "baselines"),
        "basetemp": sorted(p.name for p in basetemp.iterdir()),
        "literal": {str(p): p.exists() for p in LITERAL_TARGETS},
    }


def layout(root: Path, outside: Path) -> None:
    """A sibling folder with something to steal or overwrite, and links in the root pointing at it."""
    (outside / "dir").mkdir(parents=True)
    (outside / "canary.txt").write_text("canary")
    (outside / "dir" / "inner.txt").write_text("inner")
    (root / "victim" / ".git" / "hooks").mkdir(parents=True)
    (root / "victim" / ".git" / "config").write_text("[core]\n")
    (root / "out").symlink_to("../outside")
    (root / "abs").symlink_to(outside)
    (root / "file").symlink_to(outside / "canary.txt")
    (root / "loop").symlink_to("loop")
    (root / "gitlink").symlink_to("victim/.git")
    (root / "inlink").symlink_to("victim")


class _Errors(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


@pytest.fixture(scope="module")
async def fuzz(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    server = EmbeddedNats(base / "nats", port=0)  # its own server: the tap sees only this module's traffic
    await server.start()
    root, outside = base / "workspaces", base / "outside"
    root.mkdir()
    layout(root, outside)
    naming = unique_naming()
    before = outside_the_root(base, root, tmp_path_factory.getbasetemp())
    engine = ScriptedEngine([WriteFile("agent-was-here.txt", "x"), "ok"])
    sidecar = Sidecar(sidecar_config(server.url, base, naming, offline_model=False, concurrency=2,
                                     jetstream={"ack_wait": 5, "retry_delay": 0.2, "max_task_bytes": MAX_TASK_BYTES}),
                      engine=engine)
    errors: list[str] = []
    handler = _Errors(errors)
    logging.getLogger("ocbridge").addHandler(handler)
    await sidecar.start()
    nc = await nats.connect(server.url)
    state = Fuzz(naming, base, root, outside, sidecar, nc, errors, before)

    async def on_message(msg) -> None:
        state.tap.append((msg.subject, msg.data, dict(msg.headers or {})))

    await nc.subscribe(">", cb=on_message, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30)
    try:
        yield state
    finally:
        logging.getLogger("ocbridge").removeHandler(handler)
        await nc.close()
        await sidecar.stop(grace=2)
        await server.stop()


# ------------------------------------------------------------------------------- the strategies


def hostile_names(root: Path, outside: Path) -> list[str]:
    return [
        "ws", "a/b/c", "..", "../outside", "a/../../outside", "./..", "out", "out/x", "out/dir/inner.txt",
        "abs", "abs/x", "file", "file/x", "loop", "loop/x", "gitlink", "gitlink/hooks", ".git", "a/.git",
        "a/.GIT/hooks", "victim/.git/hooks/post-checkout", "inlink", "inlink/sub", str(outside), str(outside / "x"),
        str(outside / "canary.txt"), str(root), str(root / "out" / "x"), f"{root}/../outside", "/", "/etc",
        "/tmp/x", "//x", ".", "", " ", "~", "~/x", "-rf", "--upload-pack=touch x", "$HOME", "a\x00b", "a\nb",
        "\t", "x" * 300, "é/ü/日本", "\u202egnp.exe", "a/" * 60, "NUL", "a\\..\\..\\b", "\ud800",
    ]


def junk() -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=6,
    )


def names(fz: Fuzz) -> st.SearchStrategy[Any]:
    """Mostly well-typed hostile names (so they get past the model to the code that uses them)."""
    pool = st.sampled_from(hostile_names(fz.root, fz.outside))
    parts = st.sampled_from(["..", ".", "a", ".git", "out", "abs", "loop", "inlink", "file", "", "é", "x" * 256])
    return st.one_of(
        pool, pool, pool, pool,
        st.lists(parts, min_size=1, max_size=5).map("/".join),
        st.text(max_size=24),
        st.one_of(st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=2)),
    )


def subjects(fz: Fuzz, task_id: str) -> st.SearchStrategy[Any]:
    n = fz.naming
    other = uuid.uuid4().hex
    return st.one_of(
        st.sampled_from([
            f"$JS.API.STREAM.DELETE.{n.stream_name}", f"$JS.API.STREAM.PURGE.{n.stream_name}",
            f"$JS.API.CONSUMER.DELETE.{n.stream_name}.{n.consumer_name}", f"$KV.{n.sessions_bucket}.victim",
            f"$KV.{n.tasks_bucket}.{record_key(other)}", f"$O.{n.object_store}.M.eA", "$SYS.REQ.SERVER.PING",
            "_INBOX.fuzz", n.task_subject, f"{n.task_subject}.x", n.cancel_subject(task_id), n.cancel_subject(other),
            n.ops_subject, n.dead_letter, n.result_subject(other), n.stream_subject(other),
            f"{n.result_prefix}.*", f"{n.result_prefix}.>", ">", "*", f"{n.result_prefix}..{task_id}",
            f"{n.result_prefix}.{task_id}.x", f"{n.result_prefix}. {task_id}", f"{n.result_prefix}.{task_id} ",
            "fuzz.elsewhere", "", " ", "a" * 600,
        ]),
        st.text(alphabet="ab.*>$ _\t\x00", max_size=12).map(lambda s: f"{n.result_prefix}.{s}"),
        st.text(max_size=12),
        junk(),
    )


@dataclass
class Case:
    body: bytes
    parsed: Any  # the JSON value, when the body is JSON
    clean: bool  # a good task, untouched: it must complete
    stage: list[str]  # input files staged in the object store before publishing
    task_id: Any


@st.composite
def cases(draw, fz: Fuzz) -> Case:
    n = fz.naming
    fz.examples += 1
    task_id = f"f{fz.examples}-{uuid.uuid4().hex[:8]}"
    body: dict[str, Any] = {
        "taskID": task_id,
        "session": {"name": f"s-{task_id}"},
        "workspace": {"name": f"ws-{draw(st.integers(0, 3))}"},
        "prompt": draw(st.text(min_size=1, max_size=40)),
        "callback": {"streamSubject": n.stream_subject(task_id), "resultSubject": n.result_subject(task_id)},
    }
    stage: list[str] = []
    kinds = st.sampled_from([
        "task_id", "session", "workspace", "workspace", "workspace", "git", "git", "files", "files", "files",
        "callback", "callback", "prompt", "timeout", "agent", "model", "extra", "nesting", "size", "drop",
        "type", "bytes",
    ])
    mutations = draw(st.lists(kinds, min_size=(count := draw(st.sampled_from([0, 1, 1, 1, 1, 2, 3]))),
                              max_size=count))
    for mutation in mutations:
        if mutation == "task_id":
            body["taskID"] = draw(st.one_of(st.sampled_from(["", " ", "a.b", "*", ">", "a b", "x" * 201, "$JS", "é",
                                                             "..", "a\x00b", "\ud800"]), st.text(max_size=12), junk()))
        elif mutation == "session":
            body["session"] = draw(st.one_of(
                st.fixed_dictionaries({"name": names(fz)}, optional={"continue": st.booleans()}),
                st.fixed_dictionaries({"name": names(fz)}, optional={"continue": junk()}), junk()))
        elif mutation == "workspace":
            workspace = st.fixed_dictionaries(
                {"name": names(fz)},
                optional={"cleanup": st.sampled_from(["on_success", "manual", "on_session_end", "never", 3]),
                          "scope": st.sampled_from(["agent", "workflow", None, "x"]), "scopeID": names(fz)})
            body["workspace"] = draw(st.one_of(workspace, workspace, workspace, junk()))
        elif mutation == "git" and isinstance(body.get("workspace"), dict):
            path = draw(st.text(alphabet="abc/-.@:%", max_size=10))
            body["workspace"]["git"] = draw(st.fixed_dictionaries(
                # Only local hosts (port 9 refuses at once) or URLs git must refuse: nothing reaches the internet.
                {"url": st.sampled_from([
                    f"http://127.0.0.1:9/{path}", f"https://127.0.0.1:9/{path}.git", "git://127.0.0.1:9/r",
                    "ssh://127.0.0.1:9/r", "file:///etc", f"ext::sh -c touch% {fz.outside}/pwned",
                    f"--upload-pack=touch {fz.outside}/pwned", f"-oProxyCommand=touch {fz.outside}/pwned",
                    f"ssh://-oProxyCommand=touch%20{fz.outside}/pwned/r", "", 7,
                ])},
                optional={"branch": names(fz), "ref": names(fz), "token": st.text(max_size=10),
                          "tokenFromKV": names(fz), "pull": st.booleans(), "shallow": st.booleans()}))
        elif mutation == "files":
            files = draw(st.one_of(st.lists(names(fz), min_size=1, max_size=3), st.lists(names(fz), max_size=3),
                                   junk()))
            body["files"] = files
            if isinstance(files, list):
                stage = [f for f in files if isinstance(f, str) and f and "\x00" not in f
                         and not any(0xD800 <= ord(c) <= 0xDFFF for c in f) and draw(st.integers(0, 3))]
        elif mutation == "callback":
            body["callback"] = draw(st.one_of(
                st.fixed_dictionaries({"streamSubject": subjects(fz, task_id), "resultSubject": subjects(fz, task_id)}),
                st.fixed_dictionaries({"streamSubject": st.just(n.stream_subject(task_id)),
                                       "resultSubject": subjects(fz, task_id)}),
                st.fixed_dictionaries({"streamSubject": subjects(fz, task_id),
                                       "resultSubject": st.just(n.result_subject(task_id))}),
                junk()))
        elif mutation == "prompt":
            body["prompt"] = draw(st.one_of(st.just(""), st.text(max_size=200), junk()))
        elif mutation == "timeout":
            body["timeout"] = draw(st.one_of(st.integers(-5, 10**15), st.sampled_from([1, 2, 0.5, "5", 1e300]),
                                             junk()))
        elif mutation == "agent":
            body["agent"] = draw(names(fz))
        elif mutation == "model":
            body["model"] = draw(st.one_of(
                st.fixed_dictionaries({"providerID": names(fz), "modelID": names(fz)}), names(fz), junk()))
        elif mutation == "extra":
            body[draw(st.text(max_size=8))] = draw(junk())
        elif mutation == "nesting":
            depth = draw(st.integers(MAX_DEPTH - 3, MAX_DEPTH + 8))
            value: Any = draw(junk())
            for _ in range(depth):
                value = [value] if draw(st.booleans()) else {"k": value}
            body[draw(st.sampled_from(["extra", "session", "prompt"]))] = value
        elif mutation == "size":
            body["prompt"] = "p" * draw(st.integers(MAX_TASK_BYTES - 600, MAX_TASK_BYTES + 200))
        elif mutation == "drop":
            body.pop(draw(st.sampled_from(sorted(body))), None)
        elif mutation == "type":
            key = draw(st.sampled_from(sorted(body)))
            body[key] = draw(junk())
    data = json.dumps(body).encode()
    parsed: Any = body
    if "bytes" in mutations:
        data = draw(st.one_of(
            st.binary(max_size=64),
            st.sampled_from([b"", b"null", b"[]", b'"x"', b"{", b"\xef\xbb\xbf" + data, data + b"garbage",
                             data[: len(data) // 2], b'{"a": "\\ud800"}', b"[" * 3000 + b"]" * 3000,
                             data.replace(b'"', b"'"), data.decode().encode("utf-16")]),
            st.just(data.decode().encode("latin-1", "replace") + b"\xff"),
        ))
        parsed = None
    return Case(data, parsed, clean=not mutations, stage=stage, task_id=body.get("taskID"))


# ----------------------------------------------------------------------------------- the oracle


async def dead_letters(fz: Fuzz) -> int:
    try:
        return (await fz.js.stream_info(fz.naming.dead_letter_stream)).state.messages
    except Exception:
        return 0


async def idle(fz: Fuzz) -> bool:
    info = await fz.js.consumer_info(fz.naming.stream_name, fz.naming.consumer_name)
    worker = fz.sidecar.worker
    return info.num_pending == 0 and info.num_ack_pending == 0 and worker is not None and not worker._handlers


async def tap_mark(fz: Fuzz, name: str) -> int:
    """Publish a marker and return the tap position just after it: everything the server routed
    before the marker is before that position."""
    subject = f"fuzzmark.{name}.{uuid.uuid4().hex}"
    await fz.nc.publish(subject, b"")
    await fz.nc.flush()

    def seen() -> int | None:
        for i in range(len(fz.tap) - 1, -1, -1):
            if fz.tap[i][0] == subject:
                return i + 1
        return None

    return await wait_until(seen, 10, "the tap marker")


def _text(value: Any) -> bool:
    """A non-empty string that is valid Unicode (no lone surrogate): one that can name anything."""
    if not isinstance(value, str) or not value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def own_ids(case: Case, naming: Naming) -> set[str]:
    """The ids a task may answer under: its taskID, or (without a usable one) the id its own result
    subject ends in."""
    ids = {case.task_id} if _text(case.task_id) else set()
    callback = case.parsed.get("callback") if isinstance(case.parsed, dict) else None
    subject = callback.get("resultSubject") if isinstance(callback, dict) else None
    if _text(subject) and subject.startswith(naming.result_prefix + "."):
        ids.add(subject[len(naming.result_prefix) + 1:])
    return ids


def named_subjects(case: Case) -> set[str]:
    callback = case.parsed.get("callback") if isinstance(case.parsed, dict) else None
    if not isinstance(callback, dict):
        return set()
    return {s for s in (callback.get("streamSubject"), callback.get("resultSubject")) if isinstance(s, str)}


def session_keys(case: Case) -> set[str]:
    session = case.parsed.get("session") if isinstance(case.parsed, dict) else None
    name = session.get("name") if isinstance(session, dict) else None
    return {kv_key(name)} if _text(name) else set()


_FORBIDDEN_API = (".DELETE.", ".PURGE.", "STREAM.UPDATE.", "STREAM.CREATE.", "CONSUMER.DURABLE.CREATE.",
                  "CONSUMER.CREATE.", ".SNAPSHOT.", ".RESTORE.", "SERVER.", "ACCOUNT.", "LEADER.")


def traffic_problems(fz: Fuzz, case: Case, window: list[tuple[str, bytes, dict[str, str]]]) -> list[str]:
    """Messages of the example that are not the task's own or the sidecar's legitimate own use."""
    n = fz.naming
    ids = own_ids(case, n)
    own = {n.stream_subject(i) for i in ids} | {n.result_subject(i) for i in ids}
    named = named_subjects(case) - own
    buckets = {n.sessions_bucket, n.state_bucket, n.tasks_bucket, n.leases_bucket, n.sidecars_bucket}
    allowed_keys = {
        # The sidecar's own heartbeat (``ocbridge status``), whatever the task.
        n.sidecars_bucket: {kv_key(fz.sidecar.id)},
        n.tasks_bucket: {record_key(i) for i in ids},
        n.sessions_bucket: session_keys(case),
        # Session leases, and the task lease each copy of a task takes while it is handled.
        n.leases_bucket: session_keys(case) | {kv_key(TASK_LEASE_PREFIX + i) for i in ids},
        n.state_bucket: {cancel_key(i) for i in ids},
    }
    real_root = os.path.realpath(fz.root)
    problems, task_copies = [], 0
    for subject, data, headers in window:
        if subject.startswith("fuzzmark."):
            continue
        if subject == n.task_subject:
            # The example's own publish, and JetStream's deliveries of it (routed to the sidecar's
            # pull inbox under the original subject): never anything else.
            task_copies += 1
            if data != case.body:
                problems.append(f"a message on the task subject that is not the task: {data[:200]!r}")
        elif subject == n.dead_letter:
            if "Ocbridge-Reason" not in headers:
                problems.append(f"a message on the dead-letter subject that is not a dead letter: {headers}")
        elif subject in named:
            problems.append(f"published to {subject!r}, which the task named but is not its own")
        elif subject.startswith((n.result_prefix + ".", n.stream_prefix + ".")):
            if subject not in own:
                problems.append(f"published to another task's subject {subject!r} (own: {sorted(own)})")
        elif subject.startswith("$JS.API."):
            if any(word in subject for word in _FORBIDDEN_API) and not subject.startswith(
                    (f"$JS.API.CONSUMER.CREATE.OBJ_{n.object_store}", f"$JS.API.CONSUMER.DELETE.OBJ_{n.object_store}")):
                problems.append(f"JetStream API call {subject!r}")
        elif subject.startswith(f"$JS.ACK.{n.stream_name}.{n.consumer_name}.") or subject.startswith(
                ("$JS.EVENT.", "$JS.FC.", "_INBOX.")):
            pass  # acks of the task message, server advisories, flow control, replies
        elif subject.startswith("$KV."):
            _, bucket, key = subject.split(".", 2)
            if bucket not in buckets:
                problems.append(f"KV write to a foreign bucket {subject!r}")
            elif key not in allowed_keys[bucket] and not (
                    bucket == n.state_bucket and kv_name(key).startswith(WORKSPACE_RECORD)
                    and Path(kv_name(key)[len(WORKSPACE_RECORD):]).is_relative_to(real_root)):
                problems.append(f"KV write to a key no part of this task names: {bucket} {kv_name(key)!r}")
        elif subject.startswith(f"$O.{n.object_store}.M."):
            name = base64.urlsafe_b64decode(subject.rsplit(".", 1)[1] + "==").decode(errors="replace")
            if not any(name.startswith(f"output/{i}/") for i in ids):
                problems.append(f"object store write outside output/<taskID>/: {name!r}")
        elif subject.startswith(f"$O.{n.object_store}.C."):
            pass  # chunks of an object whose name is checked above
        else:
            problems.append(f"message on an unexpected subject {subject!r}")
    if not task_copies:
        problems.append("the task itself was not seen on the task subject")
    return problems


def valid_task(case: Case) -> bool:
    if not isinstance(case.parsed, dict) or len(case.body) > MAX_TASK_BYTES:
        return False
    if nesting_depth(case.parsed, MAX_DEPTH) > MAX_DEPTH:
        return False
    try:
        Task.from_wire(case.parsed)
    except Exception:
        return False
    return True


# ------------------------------------------------------------------------------------ the tests


async def check(fz: Fuzz, case: Case) -> str:
    """Publish ``case`` and check every promise of the module docstring; returns its outcome."""
    if case.stage and _text(case.task_id):
        store = await fz.js.object_store(fz.naming.object_store)
        for name in case.stage:
            await store.put(f"input/{case.task_id}/{name}", b"staged input")
    dl_before, errors_before = await dead_letters(fz), len(fz.errors)
    start = await tap_mark(fz, "start")
    await fz.nc.publish(fz.naming.task_subject, case.body)
    await fz.nc.flush()

    def answered() -> bool:
        return any(s.startswith(fz.naming.result_prefix + ".") for s, _, _ in fz.tap[start:])

    async def decided() -> bool:
        return (answered() or await dead_letters(fz) > dl_before) and await idle(fz)

    await wait_until(decided, 20, "an answer or a dead letter, and the sidecar idle")
    end = await tap_mark(fz, "end")
    window = fz.tap[start:end]
    results = [(s, TaskResult.from_wire(d)) for s, d, _ in window if s.startswith(fz.naming.result_prefix + ".")]
    letters = await dead_letters(fz) - dl_before
    seen = f"results: {[(s, r.status.value, r.error_type, r.error) for s, r in results]}; dead letters: {letters}"

    assert len(results) + letters == 1, f"not exactly one answer: {seen}"
    if results:
        subject, result = results[0]
        assert subject == fz.naming.result_subject(result.task_id) and result.task_id in own_ids(case, fz.naming), seen
        assert not (result.error or "").startswith("internal error"), seen
        if result.status == "completed":
            assert valid_task(case), f"a task that is not valid completed: {seen}"
    if case.clean:
        assert results and results[0][1].status == "completed", f"a good task did not complete: {seen}"
    assert traffic_problems(fz, case, window) == [], seen
    crashes = [e for e in fz.errors[errors_before:] if "crashed" in e or "unexpectedly" in e]
    assert crashes == [], seen
    assert fz.sidecar.worker is not None and not fz.sidecar.worker._loop_task.done(), "the fetch loop stopped"
    assert tree(fz.outside) == fz.outside_before, f"something changed outside the workspace root ({seen})"
    if not results:
        return "dead letter"
    return f"result: {results[0][1].status.value} {results[0][1].error_type or ''}".strip()


@settings(max_examples=150, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
async def test_every_body_ends_in_one_answer_on_its_own_subjects(fuzz: Fuzz, data):
    case = data.draw(cases(fuzz), label="case")
    note(f"body: {case.body[:600]!r}")
    event(await check(fuzz, case))


def test_the_traffic_check_flags_what_a_task_may_not_cause():
    """The oracle itself: legitimate traffic of a task passes, each planted violation is named."""
    naming, other = unique_naming(), "someone-else"
    fz = Fuzz.__new__(Fuzz)
    fz.naming = naming
    fz.root = root = Path("/nonexistent/workspaces")
    fz.sidecar = types.SimpleNamespace(id="sidecar-1")
    body = {"taskID": "t1", "session": {"name": "s1"},
            "callback": {"streamSubject": naming.stream_subject("t1"), "resultSubject": "_INBOX.fuzz"}}
    case = Case(json.dumps(body).encode(), body, clean=False, stage=[], task_id="t1")
    meta = base64.urlsafe_b64encode(b"output/t1/result.result.json").decode().rstrip("=")
    legit = [
        (naming.task_subject, case.body, {}), (naming.task_subject, case.body, {}),
        (naming.stream_subject("t1"), b"{}", {}), (naming.result_subject("t1"), b"{}", {}),
        (f"$JS.API.CONSUMER.MSG.NEXT.{naming.stream_name}.{naming.consumer_name}", b"", {}),
        (f"$JS.API.STREAM.MSG.GET.KV_{naming.tasks_bucket}", b"", {}), ("_INBOX.abc.def", b"", {}),
        (f"$JS.ACK.{naming.stream_name}.{naming.consumer_name}.1.1.1.0.0", b"", {}),
        ("$JS.EVENT.ADVISORY.API", b"", {}),
        (f"$KV.{naming.tasks_bucket}.{record_key('t1')}", b"", {}), (f"$KV.{naming.sessions_bucket}.s1", b"", {}),
        (f"$KV.{naming.leases_bucket}.s1", b"", {}),
        (f"$KV.{naming.state_bucket}.{kv_key(WORKSPACE_RECORD + str(root / 'ws'))}", b"", {}),
        (f"$O.{naming.object_store}.M.{meta}", b"", {}), (naming.dead_letter, b"", {"Ocbridge-Reason": "x"}),
        (f"$KV.{naming.sidecars_bucket}.sidecar-1", b"", {}),  # its heartbeat
    ]
    assert traffic_problems(fz, case, legit) == []
    planted = [
        ("_INBOX.fuzz", b"", {}),  # named by the task, not its own
        (f"$JS.API.STREAM.DELETE.{naming.stream_name}", b"", {}),
        (f"$JS.API.STREAM.PURGE.{naming.stream_name}", b"", {}),
        (naming.result_subject(other), b"", {}), (naming.stream_subject(other), b"", {}),
        (f"$KV.{naming.sessions_bucket}.victim", b"", {}), (f"$KV.{naming.tasks_bucket}.{record_key(other)}", b"", {}),
        (f"$KV.{naming.state_bucket}.{kv_key(WORKSPACE_RECORD + '/etc')}", b"", {}), ("$KV.foreign.x", b"", {}),
        (f"$KV.{naming.sidecars_bucket}.another-sidecar", b"", {}),
        (f"$O.{naming.object_store}.M.{base64.urlsafe_b64encode(b'input/x/y').decode()}", b"", {}),
        (naming.task_subject, b"forged", {}), (naming.dead_letter, b"", {}), ("fuzz.elsewhere", b"", {}),
    ]
    problems = traffic_problems(fz, case, [*legit, *planted])
    assert len(problems) == len(planted), problems


ROLES = ["workspace", "workspace, deleted on success", "session", "input file", "git branch", "agent"]


async def test_every_hostile_name_in_every_role(fuzz: Fuzz):
    """The fuzzer's name pool, each name in each role once (random draws would miss most of them):
    the symlinks in the root, ``..``, ``.git``, absolute paths inside and outside the root, NUL..."""
    fz, failures, outcomes = fuzz, [], {}
    for role in ROLES:
        for name in hostile_names(fz.root, fz.outside):
            fz.examples += 1
            task_id = f"n{fz.examples}-{uuid.uuid4().hex[:6]}"
            body: dict[str, Any] = {
                "taskID": task_id, "session": {"name": f"s-{task_id}"}, "workspace": {"name": f"ws-{task_id}"},
                "prompt": "go", "callback": {"streamSubject": fz.naming.stream_subject(task_id),
                                             "resultSubject": fz.naming.result_subject(task_id)},
            }
            stage = []
            if role == "workspace":
                body["workspace"]["name"] = name
            elif role == "workspace, deleted on success":
                body["workspace"] = {"name": name, "cleanup": "on_success", "scope": "agent"}
            elif role == "session":
                body["session"]["name"] = name
            elif role == "input file":
                body["files"] = [name]
                stage = [name] if _text(name) and "\x00" not in name else []
            elif role == "git branch":
                body["workspace"]["git"] = {"url": "https://127.0.0.1:9/r.git", "branch": name}
            elif role == "agent":
                body["agent"] = name
            case = Case(json.dumps(body).encode(), body, clean=False, stage=stage, task_id=task_id)
            try:
                outcome = await check(fz, case)
            except AssertionError as exc:
                failures.append(f"{role} {name!r}: {str(exc).splitlines()[0]}")
            else:
                outcomes[(role, name)] = outcome
    assert failures == [], "\n".join(failures)
    # Names leading out of the root through its symlinks never make a workspace there.
    for name in ("out", "out/x", "abs/x", "file", "loop/x", "gitlink", str(fz.root / "out" / "x")):
        assert outcomes[("workspace", name)].startswith("result: error"), (name, outcomes[("workspace", name)])


async def test_afterwards_a_good_task_completes_and_nothing_was_written_outside_the_root(fuzz: Fuzz,
                                                                                       tmp_path_factory):
    fz = fuzz
    task_id = uuid.uuid4().hex
    body = {"taskID": task_id, "session": {"name": "after"}, "workspace": {"name": "after"}, "prompt": "go",
            "callback": {"streamSubject": fz.naming.stream_subject(task_id),
                         "resultSubject": fz.naming.result_subject(task_id)}}
    results: asyncio.Queue = asyncio.Queue()
    sub = await fz.nc.subscribe(fz.naming.result_subject(task_id), cb=results.put)
    await fz.nc.publish(fz.naming.task_subject, json.dumps(body).encode())
    result = TaskResult.from_wire((await asyncio.wait_for(results.get(), 20)).data)
    await sub.unsubscribe()
    assert result.status == "completed"
    assert (fz.root / "after" / "agent-was-here.txt").read_text() == "x"
    assert outside_the_root(fz.base, fz.root, tmp_path_factory.getbasetemp()) == fz.before
