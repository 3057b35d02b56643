"""The client's reads and writes in JetStream storage, below :class:`~.client.CodingClient`.

:class:`ClientStore` opens each KV bucket once, puts keys that expire (a message TTL where the
bucket allows it), searches the task stream for a queued task, and reads a message's spilled
fields back from the object store. It remembers what it learned of each bucket and stream; the
subjects, bucket names and limits come with every call, from the client's own settings.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.errors import Error as NatsError
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError
from nats.js.kv import KeyValue

from ocbridge.client.kv import bind_bucket, json_object
from ocbridge.client.protocol.spill import restore as restore_spilled

log = logging.getLogger(__name__)

__all__ = ["ClientStore"]


class ClientStore:
    """JetStream storage as one client uses it (its buckets opened, its findings kept)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._buckets: dict[str, KeyValue] = {}
        #: Per bucket: whether a key may carry its own TTL.
        self._msg_ttl: dict[str, bool] = {}
        #: Per stream: whether it keeps messages once acknowledged (limits retention).
        self._keeps_acked: dict[str, bool] = {}

    async def bucket(self, name: str) -> KeyValue:
        """The KV bucket ``name`` (``NotFoundError`` when it does not exist)."""
        if name not in self._buckets:
            self._buckets[name] = await bind_bucket(self._js, name)
        return self._buckets[name]

    async def put_expiring(self, bucket: str, key: str, value: bytes, ttl: float) -> None:
        """Put ``key`` so that it disappears after ``ttl`` seconds (see :meth:`CodingClient.cancel`)."""
        kv = await self.bucket(bucket)
        if bucket not in self._msg_ttl:
            config = (await kv.status()).stream_info.config
            # A bucket TTL already expires every key; a message TTL needs the stream's permission.
            self._msg_ttl[bucket] = not config.max_age and bool(config.allow_msg_ttl)
            if not config.max_age and not config.allow_msg_ttl:
                log.info("bucket %s has no TTL and refuses message TTLs: cancel keys stay until a sidecar "
                         "deletes them", bucket)
        if self._msg_ttl[bucket]:
            try:
                await self._js.publish(f"$KV.{bucket}.{key}", value, msg_ttl=max(1, int(ttl)))
                return
            except APIError as exc:
                log.info("bucket %s refused a message TTL (%s); putting %s without one", bucket, exc, key)
                self._msg_ttl[bucket] = False
        await kv.put(key, value)

    # ------------------------------------------------------------------------------ task stream

    async def is_queued(
        self, task_subject: str, task_id: str, where: tuple[str, int] | None, *, scan_limit: int
    ) -> bool | None:
        """Whether the task waits in the stream over ``task_subject`` (see :meth:`CodingClient.is_queued`);
        at most ``scan_limit`` messages are looked through."""
        js = self._js
        try:
            if where is not None:
                stream = where[0]
                if await self._keeps_acknowledged(stream):
                    return None
                try:
                    return _is_task_message(await js.get_msg(stream, where[1]), task_id)
                except NotFoundError:
                    return False
            try:
                stream = await js.find_stream_name_by_subject(task_subject)
            except NotFoundError:
                return False
            info = await js.stream_info(stream)
            self._keeps_acked[stream] = info.config.retention == api.RetentionPolicy.LIMITS
            if self._keeps_acked[stream]:
                return None
            seq = info.state.first_seq
            for _ in range(min(info.state.messages, scan_limit)):
                try:
                    msg = await js.get_msg(stream, seq, subject=task_subject, next=True)
                except NotFoundError:
                    return False
                if _is_task_message(msg, task_id):
                    return True
                seq = (msg.seq or seq) + 1
            return False if info.state.messages <= scan_limit else None
        except (TimeoutError, NatsError) as exc:
            log.debug("task %s: cannot search the task stream: %r", task_id, exc)
            return None

    async def _keeps_acknowledged(self, stream: str) -> bool:
        """Whether ``stream`` keeps tasks after they are acknowledged (limits retention): then a
        task found there may have finished long ago. Ours is a work queue, which does not."""
        if stream not in self._keeps_acked:
            info = await self._js.stream_info(stream)
            self._keeps_acked[stream] = info.config.retention == api.RetentionPolicy.LIMITS
        return self._keeps_acked[stream]

    # ----------------------------------------------------------------------------- object store

    async def unspill(self, object_store: str, payload: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        """``payload`` with its spilled fields read back from ``object_store`` (see
        :meth:`CodingClient.unspill`; never raises)."""
        spilled = payload.get("spilled")
        if not spilled or not isinstance(spilled, dict):
            return payload
        names = {str(name) for name in spilled.values()}
        objects: dict[str, bytes | None] = dict.fromkeys(names)
        problem = "missing"
        try:
            async with asyncio.timeout(timeout):
                store = await self._js.object_store(object_store)
                for name in names:
                    try:
                        data = (await store.get(name)).data
                    except NotFoundError:
                        continue
                    objects[name] = data if _spilled_value_ok(data) else None
        except NotFoundError:
            problem = f"object store {object_store} does not exist"
        except TimeoutError:
            problem = f"not read within {timeout:.0f}s"
        except NatsError as exc:
            problem = f"unreadable ({exc.__class__.__name__})"
        restored = restore_spilled(payload, objects)
        if restored.get("spilled"):
            log.warning("%s %s: spilled field(s) %s not read back from object store %s (%s)",
                        "task" if "taskID" in payload else "op", payload.get("taskID") or payload.get("op"),
                        ", ".join(f"{k} ({v})" for k, v in restored["spilled"].items()),
                        object_store, problem)
        return restored


def _is_task_message(msg: api.RawStreamMsg, task_id: str) -> bool:
    if (msg.headers or {}).get("Nats-Msg-Id") == task_id:
        return True
    body = json_object(msg.data)  # anyone may publish on the task subject: any bytes at all
    return body is not None and body.get("taskID") == task_id


def _spilled_value_ok(data: bytes) -> bool:
    value = json_object(data)
    return value is not None and "value" in value
