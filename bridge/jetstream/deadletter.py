"""Dead letters: messages that cannot be answered are kept on the dead-letter subject, logged,
and terminated so that they never loop."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ocbridge.bridge.redact import Redactor

log = logging.getLogger(__name__)


class DeadLetters:
    """Publishes unanswerable messages to ``subject`` (a stream keeps them) and terminates them."""

    def __init__(self, js: JetStreamContext, subject: str, redactor: Redactor) -> None:
        self._js = js
        self._subject = subject
        self._redactor = redactor

    async def send(self, msg: Msg, reason: str) -> None:
        """Keep ``msg`` for inspection with ``reason``, log it, and terminate its delivery."""
        reason = self._redactor.text(reason)
        preview = self._redactor.text(msg.data[:200].decode("utf-8", "replace"))
        log.error("dead-lettering message %s: %s; payload starts %r", _sequence(msg), reason, preview)
        try:
            await self._js.publish(
                self._subject,
                # Kept for inspection, minus credentials: token fields dropped where the body can be
                # parsed, and anything that looks like a credential masked in any case.
                self._redactor.text(_without_tokens(msg.data)).encode(),
                headers={"Ocbridge-Reason": reason[:500], "Ocbridge-Subject": msg.subject},
                timeout=5,
            )
        except Exception as exc:
            log.error("dead-letter publish failed: %s", exc)
        await msg.term()


#: Fields that carry credentials on the wire (``workspace.git.token``, ops ``token``...).
_CREDENTIAL_FIELDS = frozenset({"token", "tokenFromKV", "password"})


def _drop_credentials(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("***" if k in _CREDENTIAL_FIELDS else _drop_credentials(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_drop_credentials(v) for v in value]
    return value


def _without_tokens(data: bytes) -> str:
    """The body as text, with credential fields masked when it parses as JSON."""
    text = data.decode("utf-8", "replace")
    try:
        return json.dumps(_drop_credentials(json.loads(text)))
    except (ValueError, RecursionError):
        return text


def _sequence(msg: Msg) -> str:
    with contextlib.suppress(Exception):
        return f"#{msg.metadata.sequence.stream}"
    return "?"
