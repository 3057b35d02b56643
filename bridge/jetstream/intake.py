"""What a delivered message is: a task to run, or a rejection (an error result, or a dead letter).

Everything here is checked before the sidecar does anything for the task, and nothing here does
I/O: the body's encoding, size and nesting (:mod:`ocbridge.client.protocol.body`), the task model,
and the callback subjects (:func:`ocbridge.client.protocol.callback_problem`). A rejection is
answered on the task's result subject only when that subject is acceptable for the task; otherwise
the message is dead-lettered and nothing is published to any subject the task named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ocbridge.client.protocol import (
    BodyError,
    Naming,
    Task,
    callback_problem,
    describe_validation_error,
    read_json_object,
)

__all__ = ["Rejection", "read_task"]


@dataclass(frozen=True)
class Rejection:
    """A message that will not run. ``result_subject`` set: answer there with an ``invalid_task``
    error result for ``task_id``; ``None``: dead-letter it."""

    reason: str
    task_id: str | None = None
    result_subject: str | None = None


def _answerable(raw: dict[str, Any], naming: Naming) -> tuple[str | None, str | None]:
    """``(task_id, result_subject)`` when an error result may be sent for ``raw``, else Nones."""
    callback = raw.get("callback")
    subject = callback.get("resultSubject") if isinstance(callback, dict) else None
    if not isinstance(subject, str):
        return None, None
    task_id = raw.get("taskID")
    if not isinstance(task_id, str) or not task_id:
        # No usable id: Station's result subject ends in it.
        prefix = naming.result_prefix + "."
        task_id = subject[len(prefix):] if subject.startswith(prefix) else None
    if not task_id or len(task_id) > 200:
        return None, None
    if callback_problem(subject, prefix=naming.result_prefix, task_id=task_id, naming=naming) is not None:
        return None, None
    return task_id, subject


def read_task(data: bytes, *, naming: Naming, max_bytes: int) -> Task | Rejection:
    """The task in ``data``, or why it will not run."""
    try:
        raw = read_json_object(data)
    except BodyError as exc:
        if exc.value is None:
            return Rejection(f"unreadable task body: {exc}")
        return Rejection(f"invalid task body: {exc}", *_answerable(exc.value, naming))
    task_id, result_subject = _answerable(raw, naming)
    if len(data) > max_bytes:
        return Rejection(f"task body of {len(data)} bytes exceeds the limit of {max_bytes}", task_id, result_subject)
    try:
        task = Task.from_wire(raw)
    except ValidationError as exc:
        return Rejection(f"invalid task: {describe_validation_error(exc)}", task_id, result_subject)
    callback = task.callback
    problems = [
        f"{name}: {problem}"
        for name, subject, prefix in (
            ("callback.streamSubject", callback.stream_subject, naming.stream_prefix),
            ("callback.resultSubject", callback.result_subject, naming.result_prefix),
        )
        if (problem := callback_problem(subject, prefix=prefix, task_id=task.task_id, naming=naming))
    ]
    if problems:
        return Rejection(f"unacceptable callback: {'; '.join(problems)}", task.task_id)
    return task
