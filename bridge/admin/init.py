"""``ocbridge init``: create (or check) every JetStream object before any sidecar runs.

Station publishes tasks with a plain core-NATS publish: with no stream over the task subject yet,
NATS drops them. ``init`` creates the task stream, the shared consumer, the dead-letter stream,
the result journal, the KV buckets and the object store with the sidecar's own code (:mod:`..jetstream.setup`) and
configuration (``--config``, ``OCBRIDGE_*``, ``--nats-url``, as ``serve`` reads them), so what it
creates is what the first sidecar would have created. Run it again at any time: it is idempotent.

One line per object: ``created``, ``ok`` (exists and matches), ``updated`` (a setting that NATS
lets us edit was brought in line with the configuration: a stream's or bucket's ``max_age``, the
consumer's ``ack_wait``/``max_deliver``) or ``FAIL`` (a mismatch that cannot be fixed in place:
the command then exits 1). Buckets Station owns (sessions, state, files) are checked, never changed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from nats.errors import Error as NatsError
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError

from ocbridge.bridge.config import BridgeConfig
from ocbridge.bridge.jetstream.journal import ensure_result_journal
from ocbridge.bridge.jetstream.setup import (
    ConsumerMismatch,
    bucket_ttls,
    ensure_buckets,
    ensure_consumer,
    ensure_dead_letter_stream,
    ensure_task_stream,
)
from ocbridge.bridge.redact import default_redactor
from ocbridge.client.connection import redact_nats_url
from ocbridge.client.fleet import duration
from ocbridge.client.protocol import STATION_BUCKET_TTL

from .common import EXIT_FAILED, EXIT_USAGE, Report, admin_config, admin_connect, within

__all__ = ["initialise", "main"]

log = logging.getLogger(__name__)


def _ttl(seconds: float | None) -> str:
    return duration(seconds) if seconds else "none"


async def _stream_info(js: JetStreamContext, name: str) -> api.StreamInfo | None:
    try:
        return await js.stream_info(name)
    except NotFoundError:
        return None


async def _set_max_age(js: JetStreamContext, info: api.StreamInfo, max_age: float, **other: object) -> None:
    """Change a stream's ``max_age`` (NATS refuses a duplicate window longer than it)."""
    window = min(info.config.duplicate_window or max_age, max_age)
    await js.update_stream(info.config.evolve(max_age=max_age, duplicate_window=window, **other))


async def _task_stream(js: JetStreamContext, config: BridgeConfig, report: Report) -> str | None:
    naming, settings = config.naming, config.jetstream
    try:
        name = await js.find_stream_name_by_subject(naming.task_subject)
    except NotFoundError:
        name = await ensure_task_stream(js, naming, settings)
        report.line("created", f"stream {name}", f"subject {naming.task_subject}, work queue, max_age "
                    f"{_ttl(settings.max_age)}, replicas {settings.replicas}")
        return name
    info = await js.stream_info(name)
    if name != naming.stream_name:
        # An operator keeps these tasks in a stream of their own: use it, do not reshape it.
        report.line("ok", f"stream {name}", f"holds {naming.task_subject} (not {naming.stream_name}: left as is)")
        return name
    changes = []
    if abs((info.config.max_age or 0) - settings.max_age) > 0.5:
        changes.append(("max_age", _ttl(info.config.max_age), _ttl(settings.max_age)))
    if (info.config.num_replicas or 1) != settings.replicas:
        changes.append(("replicas", str(info.config.num_replicas or 1), str(settings.replicas)))
    if not changes:
        report.line("ok", f"stream {name}", f"subject {naming.task_subject}, max_age {_ttl(settings.max_age)}")
        return name
    what = ", ".join(f"{field} {old} -> {new}" for field, old, new in changes)
    try:
        await _set_max_age(js, info, settings.max_age, num_replicas=settings.replicas)
    except APIError as exc:
        report.line("FAIL", f"stream {name}", f"differs from the configuration ({what}) and NATS refused to change "
                    f"it: {exc.description or exc}")
        return name
    report.line("updated", f"stream {name}", what)
    return name


async def _dead_letter_stream(js: JetStreamContext, config: BridgeConfig, report: Report) -> None:
    naming = config.naming
    try:
        name = await js.find_stream_name_by_subject(naming.dead_letter)
        report.line("ok", f"stream {name}", f"dead letters ({naming.dead_letter})")
        return
    except NotFoundError:
        pass
    await ensure_dead_letter_stream(js, naming)
    try:
        name = await js.find_stream_name_by_subject(naming.dead_letter)
    except NotFoundError:  # the name is taken by a stream over other subjects
        report.line("FAIL", f"stream {naming.dead_letter_stream}", f"cannot be created for {naming.dead_letter}: "
                    "the name is used by a stream over other subjects")
        return
    report.line("created", f"stream {name}", f"dead letters ({naming.dead_letter}), max_age 30d")


async def _result_journal(js: JetStreamContext, config: BridgeConfig, report: Report) -> None:
    naming, settings = config.naming, config.jetstream
    subjects = f"{naming.result_prefix}.>"
    existed = await _stream_info(js, naming.results_stream)
    journal = await ensure_result_journal(js, naming, max_age=settings.task_record_ttl, replicas=settings.replicas)
    if journal.stream is None:
        report.line("FAIL", f"stream {naming.results_stream}", f"cannot keep the results on {subjects}: the name "
                    "is used by a stream over other subjects")
    elif existed is None and journal.stream == naming.results_stream:
        report.line("created", f"stream {journal.stream}", f"result journal ({subjects}), "
                    f"max_age {_ttl(settings.task_record_ttl)}")
    else:
        report.line("ok", f"stream {journal.stream}", f"result journal ({subjects})")


async def _consumer(js: JetStreamContext, stream: str, config: BridgeConfig, report: Report) -> None:
    naming, settings = config.naming, config.jetstream
    what = f"consumer {naming.consumer_name}"
    try:
        before = (await js.consumer_info(stream, naming.consumer_name)).config
    except NotFoundError:
        before = None
    try:
        actual = await ensure_consumer(js, stream, naming, settings)
    except ConsumerMismatch as exc:
        report.line("FAIL", what, str(exc))
        return
    wanted = f"ack_wait {settings.ack_wait:g}s, max_deliver {settings.max_deliveries}"
    if before is None:
        report.line("created", what, f"on {stream}, pull, explicit ack, {wanted}")
        return
    if abs(actual.ack_wait - settings.ack_wait) > 0.01 or actual.max_deliver != settings.max_deliveries:
        report.line("FAIL", what, f"has ack_wait {actual.ack_wait:g}s, max_deliver {actual.max_deliver}; configured "
                    f"{wanted}, and NATS did not accept the change (delete the consumer: nats consumer rm {stream} "
                    f"{naming.consumer_name})")
        return
    changed = [f"{field} {old} -> {new}" for field, old, new in (
        ("ack_wait", f"{before.ack_wait or 0:g}s", f"{settings.ack_wait:g}s"),
        ("max_deliver", str(before.max_deliver), str(settings.max_deliveries)),
    ) if old != new]
    report.line("updated" if changed else "ok", what, ", ".join(changed) or wanted)


async def _buckets(js: JetStreamContext, config: BridgeConfig, report: Report) -> None:
    naming, settings = config.naming, config.jetstream
    ttls = bucket_ttls(naming, settings, config.observability.heartbeat_ttl)
    # Station creates (and owns) these; their settings are reported, never changed.
    station_owned = {naming.sessions_bucket, naming.state_bucket}
    existed = {name: await _stream_info(js, f"KV_{name}") is not None for name in ttls}
    files_existed = await _stream_info(js, f"OBJ_{naming.object_store}") is not None
    await ensure_buckets(js, naming, settings, config.observability.heartbeat_ttl)
    for name, ttl in ttls.items():
        info = await js.stream_info(f"KV_{name}")
        max_age = info.config.max_age or 0
        what = f"bucket {name}"
        if not existed[name]:
            report.line("created", what, f"history 1, max_age {_ttl(max_age)}")
        elif abs(max_age - ttl) <= 0.5:
            report.line("ok", what, f"max_age {_ttl(max_age)}")
        elif name in station_owned:
            report.line("ok", what, f"max_age {_ttl(max_age)} (Station's bucket: left as is)")
        else:
            try:
                await _set_max_age(js, info, ttl)
            except APIError as exc:
                report.line("FAIL", what, f"max_age {_ttl(max_age)}, configured {_ttl(ttl)}; NATS refused the "
                            f"change: {exc.description or exc}")
                continue
            report.line("updated", what, f"max_age {_ttl(max_age)} -> {_ttl(ttl)}")
    what = f"object store {naming.object_store}"
    if files_existed:
        report.line("ok", what)
    else:
        report.line("created", what, f"max_age {_ttl(STATION_BUCKET_TTL)}")


async def initialise(config: BridgeConfig, report: Report, *, timeout: float = 10.0) -> None:
    """Create or check every object (see the module notes); each step within ``timeout`` seconds.
    Raises ``ConnectionError`` when NATS cannot be reached."""
    nc = await admin_connect(config, timeout)
    try:
        js = nc.jetstream(timeout=timeout)
        try:
            await within(js.account_info(), timeout)
        except (NatsError, TimeoutError) as exc:
            report.line("FAIL", "jetstream", f"not available on {redact_nats_url(config.nats.url)}: "
                        f"{exc.__class__.__name__}")
            return
        stream = await within(_task_stream(js, config, report), timeout)
        await within(_dead_letter_stream(js, config, report), timeout)
        await within(_result_journal(js, config, report), timeout)
        if stream is not None:
            await within(_consumer(js, stream, config, report), timeout)
        await within(_buckets(js, config, report), timeout * 3)
    finally:
        await nc.close()


def main(args: argparse.Namespace) -> int:
    """``ocbridge init``: 0 when everything exists and matches, 1 on a mismatch, 2 when it cannot run."""
    config = admin_config(args, "init")
    if config is None:
        return EXIT_USAGE
    if not config.nats.url:
        print("ocbridge init: no NATS URL (--nats-url, OCBRIDGE_NATS_URL or nats.url): a sidecar without one "
              "starts its own embedded NATS and creates everything itself", file=sys.stderr)
        return EXIT_USAGE
    report = Report()
    timeout = getattr(args, "timeout", None) or 10.0
    try:
        asyncio.run(initialise(config, report, timeout=timeout))
    except ConnectionError as exc:
        print(f"ocbridge init: {default_redactor.text(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except (TimeoutError, NatsError) as exc:
        report.line("FAIL", "nats", f"{exc.__class__.__name__}: {exc}")
    return EXIT_FAILED if report.failed else 0
