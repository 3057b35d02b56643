"""NATS connection settings and a connect helper that retries instead of giving up."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from pydantic import BaseModel, ConfigDict, SecretStr

log = logging.getLogger(__name__)


class TLSOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure_skip_verify: bool = False

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if self.cert_file:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        if self.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


class NatsOptions(BaseModel):
    """How to reach NATS. Secrets are :class:`SecretStr` so they never show in reprs or logs."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = None
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    creds_file: Path | None = None
    tls: TLSOptions | None = None
    name: str = "ocbridge"
    connect_timeout: float = 5.0

    def connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "servers": [u.strip() for u in (self.url or "nats://127.0.0.1:4222").split(",")],
            "name": self.name,
            "connect_timeout": self.connect_timeout,
            # Reconnect for ever: a sidecar must survive a NATS restart.
            "max_reconnect_attempts": -1,
            # Half a second between attempts on one server: a restarted server is back in well
            # under a second, and every in-flight task waits on this reconnect.
            "reconnect_time_wait": 0.5,
            "allow_reconnect": True,
        }
        if self.user:
            kwargs["user"] = self.user
        if self.password:
            kwargs["password"] = self.password.get_secret_value()
        if self.token:
            kwargs["token"] = self.token.get_secret_value()
        if self.creds_file:
            kwargs["user_credentials"] = str(self.creds_file)
        if self.tls:
            kwargs["tls"] = self.tls.context()
        return kwargs


async def _log_error(exc: Exception) -> None:
    log.warning("nats: %s", exc.__class__.__name__ if not str(exc) else exc)


async def _log_reconnect() -> None:
    log.info("nats: reconnected")


async def connect(options: NatsOptions, *, retry_for: float | None = None, **extra: Any) -> NATS:
    """Connect to NATS; a failed *first* connect is retried (for ever when ``retry_for`` is None).

    nats-py would retry a first connect by itself for ever (reconnects are unlimited), even on an
    authorization error, so each attempt is made with reconnects off, in a loop of our own with
    capped exponential backoff that ``retry_for`` bounds; reconnecting is turned on once connected
    (unless ``allow_reconnect=False`` is passed: a one-shot command). With ``retry_for``, the
    attempts end within it and an authorization error ends them at once (trying again will not
    help); the ``ConnectionError`` names the reason.
    """
    kwargs = options.connect_kwargs()
    connection: list[NATS] = []

    async def log_disconnect() -> None:
        # A deliberate close or drain also "disconnects": only an unexpected loss is worth a warning.
        if connection and not (connection[0].is_closed or connection[0].is_draining):
            log.warning("nats: disconnected, reconnecting")

    kwargs.setdefault("error_cb", _log_error)
    kwargs.setdefault("disconnected_cb", log_disconnect)
    kwargs.setdefault("reconnected_cb", _log_reconnect)
    kwargs.update(extra)
    reconnect = kwargs.pop("allow_reconnect", True)
    loop = asyncio.get_running_loop()
    deadline = None if retry_for is None else loop.time() + retry_for
    delay = 0.2
    while True:
        try:
            attempt = nats.connect(allow_reconnect=False, **kwargs)
            nc = await (attempt if deadline is None else asyncio.wait_for(attempt, max(0.1, deadline - loop.time())))
            # Read by nats-py when the connection is lost, not at connect time.
            nc.options["allow_reconnect"] = reconnect
            connection.append(nc)
            return nc
        except Exception as exc:
            reason = "no answer" if isinstance(exc, TimeoutError) else (str(exc) or type(exc).__name__)
            if deadline is not None and ("authorization" in reason.lower() or loop.time() + delay > deadline):
                raise ConnectionError(f"cannot connect to NATS at {redact_nats_url(options.url)}: {reason}") from None
            log.warning("nats: first connect failed (%s), retrying in %.1fs", reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def redact_nats_url(url: str | None) -> str:
    """A NATS server list (``nats://u:p@h1:4222,nats://h2``) for display: ``user:pass@`` or ``token@``
    becomes ``***@``; no URL at all shows the default server.

    Not the git layer's ``redact_git_url``: that one keeps a usable URL (drops the credentials, keeps
    an ssh login) for one git remote; this one never parses, so it cannot fail on any value."""
    if not url:
        return "nats://127.0.0.1:4222"
    out = []
    for part in url.split(","):
        scheme, sep, rest = part.partition("://")
        if sep and "@" in rest:
            rest = "***@" + rest.split("@", 1)[1]
        out.append(scheme + sep + rest)
    return ",".join(out)
