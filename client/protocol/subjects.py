"""Rules for NATS subjects that come from the wire.

A task names the subjects its events and result go to, and the sidecar publishes there with its
own credentials. So a callback must name one concrete subject (no wildcard, no empty token, no
whitespace), never a reserved one (``$``-prefixed APIs such as ``$JS.API``, ``$KV``, ``$O``,
``$SYS``; ``_INBOX`` replies; the task, cancel, ops and dead-letter subjects) and, by default,
exactly the task's own subjects (``<prefix>.<taskID>``: :attr:`.Naming.callbacks`).
"""

from __future__ import annotations

from .naming import Naming

__all__ = ["MAX_SUBJECT_LENGTH", "callback_problem", "is_concrete_subject"]

#: Longer subjects are refused (NATS accepts more, nothing legitimate needs it).
MAX_SUBJECT_LENGTH = 512
_RESERVED_PREFIXES = ("$", "_INBOX.")


def is_concrete_subject(subject: str) -> bool:
    """Whether ``subject`` names one subject: no empty token, no wildcard, no whitespace."""
    return (
        bool(subject)
        and len(subject) <= MAX_SUBJECT_LENGTH
        and all(
            token and token not in ("*", ">") and not any(ch.isspace() or ord(ch) < 32 for ch in token)
            for token in subject.split(".")
        )
    )


def _under(subject: str, root: str) -> bool:
    return subject == root or subject.startswith(root + ".")


def callback_problem(subject: str, *, prefix: str, task_id: str, naming: Naming) -> str | None:
    """Why ``subject`` may not be a callback of task ``task_id`` (``None`` when it may).

    ``prefix`` is the configured stream or result prefix the subject belongs under.
    """
    if not is_concrete_subject(subject):
        return f"{subject!r} is not one concrete subject (wildcards, empty tokens or whitespace)"
    if subject.startswith(_RESERVED_PREFIXES):
        return f"{subject!r} is a reserved subject ($-prefixed API or inbox)"
    for root in (naming.task_subject, naming.cancel_root, naming.ops_subject, naming.dead_letter):
        if _under(subject, root):
            return f"{subject!r} is the sidecar's own subject {root!r}"
    if naming.callbacks == "own" and subject != f"{prefix}.{task_id}":
        return f"{subject!r} is not this task's own subject {prefix}.{task_id}"
    if naming.callbacks == "prefix" and not subject.startswith(prefix + "."):
        return f"{subject!r} is not under {prefix!r}"
    return None
