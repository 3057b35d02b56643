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
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from ocbridge.bridge.config import JetStreamSettings
from ocbridge.client.protocol import Naming
from ocbridge.client.streams import ensure_task_stream as _ensure_task_stream

log = logging.getLogger(__name__)


@dataclass
class Buckets:
    sessions: KeyValue
    state: KeyValue
    tasks: KeyValue
    files: ObjectStore


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


async def ensure_consumer(
    js: JetStreamContext, stream: str, naming: Naming, settings: JetStreamSettings
) -> None:
    """The durable pull consumer all sidecars share."""
    config = api.ConsumerConfig(
        durable_name=naming.consumer_name,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait,
        # One delivery more than the attempts allowed: the extra one turns into an error result.
        max_deliver=settings.max_attempts + 1,
        filter_subject=naming.task_subject,
        max_ack_pending=10_000,
        deliver_policy=api.DeliverPolicy.ALL,
    )
    try:
        await js.add_consumer(stream, config)
    except BadRequestError as exc:
        # An existing consumer with other settings: keep it working rather than refuse to start.
        log.warning("using existing consumer %s as is (%s)", naming.consumer_name, exc.description)


async def _kv(js: JetStreamContext, bucket: str, *, history: int = 1, ttl: float | None = None) -> KeyValue:
    with contextlib.suppress(NotFoundError):
        return await js.key_value(bucket)
    try:
        return await js.create_key_value(bucket=bucket, history=history, ttl=ttl)
    except BadRequestError:
        return await js.key_value(bucket)


async def ensure_buckets(js: JetStreamContext, naming: Naming, settings: JetStreamSettings) -> Buckets:
    sessions = await _kv(js, naming.sessions_bucket, history=5)
    state = await _kv(js, naming.state_bucket)
    tasks = await _kv(js, naming.tasks_bucket, ttl=settings.task_record_ttl)
    try:
        files = await js.object_store(naming.object_store)
    except NotFoundError:
        try:
            files = await js.create_object_store(naming.object_store)
        except BadRequestError:
            files = await js.object_store(naming.object_store)
    return Buckets(sessions=sessions, state=state, tasks=tasks, files=files)
