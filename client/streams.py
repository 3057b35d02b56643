"""The JetStream stream that persists tasks, defined once for the sidecar and the client.

Station publishes tasks with a plain core-NATS publish; the stream over the task subject keeps
them until a sidecar takes them. Whoever comes first (a sidecar starting, or a client publishing
before any sidecar ever ran) creates it, so no task is lost for want of a stream.
"""

from __future__ import annotations

from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError

from ocbridge.client.protocol import Naming

DEFAULT_MAX_AGE = 7 * 24 * 3600.0


async def ensure_task_stream(
    js: JetStreamContext, naming: Naming, *, max_age: float = DEFAULT_MAX_AGE, replicas: int = 1
) -> str:
    """Return the name of the stream holding the task subject, creating it when needed."""
    try:
        # Someone (another deployment, an operator) may already keep these tasks in a stream.
        return await js.find_stream_name_by_subject(naming.task_subject)
    except NotFoundError:
        pass
    config = api.StreamConfig(
        name=naming.stream_name,
        subjects=[naming.task_subject],
        retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE,
        max_age=max_age,
        num_replicas=replicas,
        duplicate_window=120,
    )
    try:
        await js.add_stream(config)
    except BadRequestError:
        # Lost a start-up race with another sidecar or client, or the name is taken by other subjects.
        info = await js.stream_info(naming.stream_name)
        if naming.task_subject not in (info.config.subjects or []):
            raise
    return naming.stream_name
