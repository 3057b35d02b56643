"""The result journal: a stream keeping the messages on the result subjects, so the sidecar that
takes over a task whose result was stored, but perhaps never published, can tell which.

A result is recorded (``publishing``) before it is published and marked ``done`` after. A sidecar
killed between the two leaves a record that cannot say whether the message went out, and core NATS
cannot either. A stream over the result subjects can: the server stores every message it accepted
there, so the result is in the journal exactly when subscribers were sent it. The next copy of the
task looks and publishes only when it is not there. Each result carries a header naming the task,
the stream message and the attempt it answers, so an older result on the same subject never counts.

Without a journal (the stream could not be made, or ``naming.callbacks`` lets results go outside
the result prefix) such a result is published a second time, and clients keep one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError

from ocbridge.client.protocol import Naming, TaskRecord

__all__ = ["RESULT_HEADER", "ResultJournal", "ensure_result_journal"]

log = logging.getLogger(__name__)

#: Header of every result message: ``<taskID> <stream seq> <attempt>`` of what it answers.
RESULT_HEADER = "Ocbridge-Result-Of"

#: A lookup slower than this counts as "cannot tell" (the result is then published again).
LOOKUP_TIMEOUT = 5.0


def result_mark(record: TaskRecord) -> str:
    """The :data:`RESULT_HEADER` value of the result stored in ``record``."""
    return f"{record.task_id} {record.stream_seq or 0} {record.attempt or 0}"


async def ensure_result_journal(
    js: JetStreamContext, naming: Naming, *, max_age: float, replicas: int = 1
) -> ResultJournal:
    """The journal over ``<result_prefix>.>``, its stream created when missing; one that cannot
    tell (with a warning) when there is no such stream and none can be made."""
    subjects = f"{naming.result_prefix}.>"
    with contextlib.suppress(BadRequestError):  # exists already (or another stream has the subjects)
        await js.add_stream(api.StreamConfig(
            name=naming.results_stream, subjects=[subjects], storage=api.StorageType.FILE,
            # Kept as long as task records are. No max_bytes: JetStream would reserve it up front.
            max_age=max_age, num_replicas=replicas,
        ))
    name: str | None = None
    with contextlib.suppress(NotFoundError):
        found = await js.find_stream_name_by_subject(subjects)
        if subjects in ((await js.stream_info(found)).config.subjects or []):
            name = found
    if name is None:
        log.warning("no stream keeps the results on %s (is the name %s taken by other subjects?): a result "
                    "whose sidecar died right after publishing it will be published twice", subjects,
                    naming.results_stream)
    return ResultJournal(js, name, naming)


class ResultJournal:
    """Tells whether the result stored in a task record reached the server (see the module)."""

    def __init__(self, js: JetStreamContext, stream: str | None, naming: Naming) -> None:
        self._js = js
        #: The journal's stream; ``None``: there is none, nothing can be told.
        self.stream = stream
        self._prefix = naming.result_prefix + "."

    async def published(self, subject: str, record: TaskRecord) -> bool | None:
        """Whether the result of ``record`` was published on ``subject``; ``None``: cannot tell."""
        if self.stream is None or not subject.startswith(self._prefix):
            return None
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                last = await self._js.get_last_msg(self.stream, subject)
        except NotFoundError:
            return False
        except Exception as exc:  # NATS restarting, the stream gone: publishing again is safe
            log.info("task %s: the result journal cannot be read (%s: %s)", record.task_id, type(exc).__name__, exc)
            return None
        return (last.headers or {}).get(RESULT_HEADER) == result_mark(record)
