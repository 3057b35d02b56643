"""Create (or bind to) the JetStream stream, consumer, KV buckets and object store the sidecar uses.

Station publishes tasks with a plain core-NATS publish; a stream over the task subject persists
them, so a task published while no sidecar runs waits instead of being lost. One durable pull
consumer shared by every sidecar gives each task to exactly one of them.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BadRequestError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from ocbridge.bridge.config import JetStreamSettings, ObservabilitySettings
from ocbridge.client.kv import bind_bucket
from ocbridge.client.protocol import STATION_BUCKET_TTL, Naming
from ocbridge.client.streams import ensure_task_stream as _ensure_task_stream

log = logging.getLogger(__name__)


@dataclass
class Buckets:
    sessions: KeyValue
    state: KeyValue
    tasks: KeyValue
    leases: KeyValue
    files: ObjectStore
    #: Sidecar heartbeats (``ocbridge status``); ``max_age`` is the heartbeat TTL.
    sidecars: KeyValue | None = None


async def ensure_task_stream(js: JetStreamContext, naming: Naming, settings: JetStreamSettings) -> str:
    """The stream holding the task subject (see :mod:`client.streams`), with the sidecar's settings."""
    stream = await _ensure_task_stream(js, naming, max_age=settings.max_age, replicas=settings.replicas)
    log.info("task stream %s over %s ready", stream, naming.task_subject)
    return stream


async def ensure_dead_letter_stream(js: JetStreamContext, naming: Naming) -> None:
    try:
        await js.find_stream_name_by_subject(naming.dead_letter)
        return
    except NotFoundError:
        pass
    with contextlib.suppress(BadRequestError):
        await js.add_stream(
            name=naming.dead_letter_stream,
            subjects=[naming.dead_letter],
            storage=api.StorageType.FILE,
            max_age=30 * 24 * 3600,
        )


@dataclass(frozen=True)
class ConsumerSettings:
    """The consumer's settings as the server has them (which may differ from the configuration)."""

    ack_wait: float
    max_deliver: int


class ConsumerMismatch(RuntimeError):
    """The existing consumer cannot be made to work with this sidecar's settings."""


async def ensure_consumer(
    js: JetStreamContext, stream: str, naming: Naming, settings: JetStreamSettings
) -> ConsumerSettings:
    """Create the durable pull consumer all sidecars share, or update it to these settings.

    NATS (2.10+) edits an existing consumer's ``ack_wait`` and ``max_deliver`` in place. When it
    cannot (another filter, another ack policy), the consumer's real settings are used if they are
    safe, and :class:`ConsumerMismatch` says what to fix if they are not: a worker that assumed its
    own ``ack_wait`` would be redelivered while running, and a small ``max_deliver`` would drop
    retried tasks without a result.
    """
    config = api.ConsumerConfig(
        durable_name=naming.consumer_name,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait,
        max_deliver=settings.max_deliveries,
        filter_subject=naming.task_subject,
        max_ack_pending=10_000,
        deliver_policy=api.DeliverPolicy.ALL,
    )
    try:
        info = await js.add_consumer(stream, config)
    except APIError as exc:  # the server refused the update (BadRequest or ServerError by version)
        info = await js.consumer_info(stream, naming.consumer_name)
        log.warning("consumer %s kept with its own settings (%s)", naming.consumer_name, exc.description)
    actual = info.config
    problems = []
    if actual.deliver_subject:
        problems.append(f"it is a push consumer (deliver_subject {actual.deliver_subject!r})")
    if actual.ack_policy != api.AckPolicy.EXPLICIT:
        problems.append(f"ack_policy is {actual.ack_policy}, not explicit")
    if actual.filter_subject not in (None, "", naming.task_subject):
        problems.append(f"filter_subject is {actual.filter_subject!r}, not {naming.task_subject!r}")
    max_deliver = actual.max_deliver if actual.max_deliver is not None else -1
    if 0 < max_deliver <= settings.max_attempts + 1:
        problems.append(f"max_deliver is {max_deliver}: retried tasks would be dropped without a result")
    if problems:
        raise ConsumerMismatch(
            f"consumer {naming.consumer_name} on stream {stream} cannot be used: {'; '.join(problems)}. "
            f"Delete it (nats consumer rm {stream} {naming.consumer_name}) and start again."
        )
    ack_wait = float(actual.ack_wait or settings.ack_wait)
    if ack_wait != settings.ack_wait:
        log.warning("consumer %s has ack_wait %.0fs (configured %.0fs): using the consumer's",
                    naming.consumer_name, ack_wait, settings.ack_wait)
    return ConsumerSettings(ack_wait=ack_wait, max_deliver=max_deliver)


async def _kv(js: JetStreamContext, bucket: str, *, ttl: float | None, direct: bool = False) -> KeyValue:
    """Bind to ``bucket``, or create it with one value per key (Station's settings).

    ``direct``: reads may be answered by any replica (``allow_direct``, as nats.go and Station
    create their buckets), one lighter request per read. The sidecar's own buckets of tasks and
    leases stay without it: a replica that lags would show a finished task as unfinished.
    """
    with contextlib.suppress(NotFoundError):
        return await bind_bucket(js, bucket)
    # BadRequestError: created meanwhile by Station, a client or another sidecar.
    with contextlib.suppress(BadRequestError):
        await js.create_key_value(bucket=bucket, history=1, ttl=ttl, direct=direct)
    return await bind_bucket(js, bucket)


def bucket_ttls(
    naming: Naming, settings: JetStreamSettings, heartbeat_ttl: float = ObservabilitySettings().heartbeat_ttl
) -> dict[str, float]:
    """Each KV bucket and the TTL (``max_age``) it is created with, whoever creates it (a sidecar,
    ``ocbridge init``); the object store gets :data:`STATION_BUCKET_TTL`."""
    return {
        naming.sessions_bucket: STATION_BUCKET_TTL,
        naming.state_bucket: STATION_BUCKET_TTL,
        naming.tasks_bucket: settings.task_record_ttl,
        naming.leases_bucket: settings.lease_ttl,
        naming.sidecars_bucket: heartbeat_ttl,
    }


async def ensure_buckets(
    js: JetStreamContext, naming: Naming, settings: JetStreamSettings,
    heartbeat_ttl: float = ObservabilitySettings().heartbeat_ttl,
) -> Buckets:
    """The KV buckets and object store, bound when they exist (whoever made them), else created
    as Station creates its own: history 1 and a 7-day TTL (the tasks bucket: the record TTL)."""
    sessions = await _kv(js, naming.sessions_bucket, ttl=STATION_BUCKET_TTL, direct=True)
    state = await _kv(js, naming.state_bucket, ttl=STATION_BUCKET_TTL, direct=True)
    tasks = await _kv(js, naming.tasks_bucket, ttl=settings.task_record_ttl)
    # A lease nobody refreshes disappears with the bucket's max_age, so that is the lease TTL.
    leases = await _kv(js, naming.leases_bucket, ttl=settings.lease_ttl)
    max_age = (await leases.status()).ttl
    if max_age and abs(max_age - settings.lease_ttl) > 0.5:
        log.warning("leases bucket %s keeps keys %.0fs, not the lease TTL %.0fs: a dead sidecar's task "
                    "waits up to %.0fs (recreate the bucket to change it)",
                    naming.leases_bucket, max_age, settings.lease_ttl, max_age)
    try:
        files = await js.object_store(naming.object_store)
    except NotFoundError:
        try:
            files = await js.create_object_store(
                naming.object_store, config=api.ObjectStoreConfig(ttl=STATION_BUCKET_TTL)
            )
        except BadRequestError:
            files = await js.object_store(naming.object_store)
    # A heartbeat nobody rewrites expires with the bucket's max_age: a dead sidecar drops out.
    sidecars = await _kv(js, naming.sidecars_bucket, ttl=heartbeat_ttl)
    return Buckets(sessions=sessions, state=state, tasks=tasks, leases=leases, files=files, sidecars=sidecars)
