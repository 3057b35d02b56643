"""Rules for NATS subjects that come from the wire."""

from __future__ import annotations

__all__ = ["is_concrete_subject"]


def is_concrete_subject(subject: str) -> bool:
    """Whether ``subject`` names one subject: no empty token, no wildcard, no whitespace."""
    return bool(subject) and all(
        token and token not in ("*", ">") and not any(ch.isspace() for ch in token) for token in subject.split(".")
    )
