"""Small helpers over NATS KV: JSON values and key listings (key rules are in :mod:`.protocol.keys`)."""

from __future__ import annotations

import json
from typing import Any

from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.errors import BadBucketError, BucketNotFoundError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue


class FollowingKeyValue(KeyValue):
    """A KV bucket that follows a change of its ``allow_direct`` setting.

    nats-py decides once, when a bucket is bound, whether reads are direct gets (answered by
    any replica, on ``$JS.API.DIRECT.GET``) or leader gets. A bucket deleted and made again
    without ``allow_direct`` (or updated) then has nobody answering direct gets: every read fails
    with "no responders" for as long as the process lives. On that failure this handle reads the
    bucket's settings again and, if they changed, retries the read the new way.
    """

    async def _get(self, key: str, revision: int | None = None) -> KeyValue.Entry:
        try:
            return await super()._get(key, revision)
        except NoRespondersError:
            if not self._direct:
                raise
            try:
                info = await self._js.stream_info(self._stream)
            except NotFoundError:
                raise NoRespondersError from None  # the bucket is gone: as unreachable as before
            if info.config.allow_direct:
                raise
            self._direct = False
            return await super()._get(key, revision)


async def bind_bucket(js: JetStreamContext, bucket: str) -> FollowingKeyValue:
    """Bind to the existing KV bucket ``bucket`` as ``js.key_value`` does, as a
    :class:`FollowingKeyValue` (``BucketNotFoundError`` when it does not exist)."""
    stream = f"KV_{bucket}"
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        raise BucketNotFoundError from None
    if info.config.max_msgs_per_subject < 1:
        raise BadBucketError
    return FollowingKeyValue(
        name=bucket, stream=stream, pre=f"$KV.{bucket}.", js=js,
        direct=bool(info.config.allow_direct),
    )


def json_object(raw: bytes | None) -> dict[str, Any] | None:
    """A stored value as a JSON object; ``None`` when absent, empty, not JSON or not an object."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deep for the parser
        return None
    return value if isinstance(value, dict) else None


async def get_json(kv: KeyValue, key: str) -> dict[str, Any] | None:
    """The JSON object stored under ``key``, or ``None`` (see :func:`json_object`)."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    return json_object(entry.value if entry is not None else None)


async def list_keys(js: JetStreamContext, bucket: str) -> list[str]:
    """The keys of a KV bucket, read from its stream's per-subject state.

    Not ``KeyValue.keys()``: its watcher can signal "no more keys" before it has processed the
    messages already delivered, so a full bucket intermittently reads as empty (nats.py#842).
    A key whose last entry is a delete marker is still listed: ``get`` reports it absent.
    """
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    return sorted(subject[len(prefix) :] for subject in info.state.subjects or {})
