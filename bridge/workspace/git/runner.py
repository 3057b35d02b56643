"""Run the git CLI safely: hardened environment and config, timeouts, credentials outside the repo.

The CLI rather than GitPython for everything: one place controls the environment, the timeout and
the process group, and network operations can be killed cleanly.

Hardening applied to every command:

- A minimal environment (no inherited ``GIT_*`` variables that could redirect git, nor the sidecar's
  own secrets), ``GIT_TERMINAL_PROMPT=0`` (never wait for a password), ``GIT_CONFIG_NOSYSTEM=1``,
  ``GIT_OPTIONAL_LOCKS=0`` (read-only commands never rewrite the user's index).
- ``GIT_ALLOW_PROTOCOL`` and ``protocol.allow=never`` + ``protocol.<scheme>.allow=always`` for the
  configured schemes only: ``ext::``/``fd::`` and other helpers cannot run, even through a
  ``url.*.insteadOf`` in a repository's config.
- ``core.hooksPath=/dev/null`` (no hook from a repository runs), ``core.fsmonitor=false``,
  ``GIT_SSH_COMMAND`` defaults to ``ssh -o BatchMode=yes`` (overrides a repository's
  ``core.sshCommand`` and never prompts).

Credentials (:class:`GitCredentials`): a credential helper script in a private 0700 directory outside
any workspace answers git with the token taken from its environment, and only for the expected
``scheme://host[:port]``. The token is never in a URL, a file, a command line or git's config.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import shlex
import shutil
import stat
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ocbridge.bridge.logs import logged_suppress
from ocbridge.bridge.observability import tracing
from ocbridge.bridge.processes import kill_group
from ocbridge.bridge.redact import Redactor, default_redactor

from .errors import GitError, GitTimeout
from .settings import GitSettings

log = logging.getLogger(__name__)

#: Inherited variables git may need (home for ~/.gitconfig and ssh keys, proxies, CA bundles...).
_ENV_KEEP = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "TZ", "XDG_CONFIG_HOME",
    "SSH_AUTH_SOCK", "SSH_AGENT_PID", "GIT_SSH", "GIT_SSH_COMMAND", "GIT_SSL_CAINFO", "GIT_SSL_CAPATH",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
})

_SECRET_VAR = "OCBRIDGE_GIT_SECRET"
_USER_VAR = "OCBRIDGE_GIT_USERNAME"
_ORIGIN_VAR = "OCBRIDGE_GIT_ORIGIN"

# A git credential helper (``<helper> get``): reads git's request on stdin and answers only for the
# expected origin, so a redirect to another host never receives the token. No secret in the file.
_HELPER = f"""#!/bin/sh
[ "$1" = get ] || exit 0
proto= host=
while IFS= read -r line; do
  case "$line" in
    protocol=*) proto=${{line#protocol=}} ;;
    host=*) host=${{line#host=}} ;;
    "") break ;;
  esac
done
[ -n "${_SECRET_VAR}" ] || exit 0
[ "$proto://$host" = "${_ORIGIN_VAR}" ] || exit 0
printf 'username=%s\\npassword=%s\\n' "${_USER_VAR}" "${_SECRET_VAR}"
"""

_STDERR_LIMIT = 64 * 1024


@dataclass(slots=True)
class GitResult:
    """What one git command produced (decoded as UTF-8 with replacement)."""

    code: int
    stdout: str
    stderr: str
    #: ``stdout`` was cut at ``max_stdout`` bytes.
    truncated: bool = False


def allowed_protocols(settings: GitSettings) -> list[str]:
    """Transports git may use, from the settings (``file`` only when local URLs are allowed)."""
    protocols = list(dict.fromkeys(settings.allowed_schemes))
    if settings.allow_file_urls:
        protocols.append("file")
    return protocols


def git_env(settings: GitSettings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The hardened environment for a git process."""
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP or k.startswith("LC_") or k == "LANG"}
    env.update({
        # Messages in English: a few are matched (e.g. "would be overwritten").
        "LC_ALL": "C",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_OPTIONAL_LOCKS": "0",
        "GIT_PROTOCOL_FROM_USER": "0",
        "GIT_ALLOW_PROTOCOL": ":".join(allowed_protocols(settings)),
        "GIT_ADVICE": "0",
    })
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    if extra:
        env.update(extra)
    return env


def git_config_args(settings: GitSettings) -> list[str]:
    """``-c`` options for every command (none of them secret: they are visible in ``ps``)."""
    config = [
        "core.hooksPath=/dev/null",
        "core.fsmonitor=false",
        "core.quotePath=false",
        "protocol.allow=never",
        "submodule.recurse=false",
        "advice.detachedHead=false",
        "advice.addEmbeddedRepo=false",
    ]
    config += [f"protocol.{p}.allow=always" for p in allowed_protocols(settings)]
    args: list[str] = []
    for item in config:
        args += ["-c", item]
    return args


class GitCredentials:
    """A token made available to git for one origin, for the duration of a ``with`` block.

    ``GitCredentials(None, ...)`` is a no-op, so callers need no special case without a token.
    The token is registered with the redactor while in use.
    """

    def __init__(
        self,
        token: str | None,
        origin: str | None,
        *,
        username: str = "x-access-token",
        redactor: Redactor | None = None,
    ) -> None:
        self._token = token or None
        self._origin = origin
        self._username = username
        self._redactor = redactor or default_redactor
        self._dir: str | None = None
        self.env: dict[str, str] = {}
        self.config: list[str] = []

    @property
    def active(self) -> bool:
        return self._token is not None and self._origin is not None

    def __enter__(self) -> GitCredentials:
        if self._token:
            self._redactor.add(self._token)
        if not self.active:
            return self
        # mkdtemp gives a 0700 directory in the system temp dir: outside any workspace.
        self._dir = tempfile.mkdtemp(prefix="ocbridge-git-")
        helper = Path(self._dir) / "credential-helper"
        helper.write_text(_HELPER)
        helper.chmod(stat.S_IRWXU)
        self.env = {_SECRET_VAR: self._token or "", _USER_VAR: self._username, _ORIGIN_VAR: self._origin or ""}
        # The empty value first clears inherited helpers, so a ``credential.helper=store`` in the
        # operator's config never persists the token to ~/.git-credentials.
        self.config = ["-c", "credential.helper=", "-c", f"credential.helper=!{shlex.quote(str(helper))}"]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.env, self.config = {}, []
        if self._token:
            self._redactor.remove(self._token)


async def _read_capped(stream: asyncio.StreamReader | None, limit: int | None) -> tuple[bytes, bool]:
    """Read a pipe to its end, keeping at most ``limit`` bytes (the rest is drained so git never
    blocks on a full pipe)."""
    if stream is None:
        return b"", False
    chunks: list[bytes] = []
    size = 0
    truncated = False
    while chunk := await stream.read(256 * 1024):
        if limit is not None and size + len(chunk) > limit:
            chunk = chunk[: max(limit - size, 0)]
            truncated = True
        if chunk:
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks), truncated


_COMMAND = re.compile(r"[a-z][a-z0-9-]{0,30}")


def _traced(run: Callable[..., Awaitable[GitResult]]) -> Callable[..., Awaitable[GitResult]]:
    """One ``git.<command>`` span per git process (``git.clone``, ``git.fetch``...): its command
    and exit code, never its arguments (URLs, paths, messages)."""

    @functools.wraps(run)
    async def traced(args: Sequence[str], *rest, **options) -> GitResult:
        if not tracing.enabled():
            return await run(args, *rest, **options)
        what = next((a for a in args if not a.startswith("-")), "git")
        what = what if _COMMAND.fullmatch(what) else "command"
        with tracing.span(f"git.{what}") as step:
            step.set_attribute("git.command", what)
            try:
                result = await run(args, *rest, **options)
            except GitError as exc:
                if exc.code is not None:
                    step.set_attribute("git.exit_code", exc.code)
                raise
            step.set_attribute("git.exit_code", result.code)
            return result

    return traced


@_traced
async def run_git(
    args: Sequence[str],
    cwd: str | Path | None = None,
    *,
    settings: GitSettings | None = None,
    env: Mapping[str, str] | None = None,
    credentials: GitCredentials | None = None,
    config: Sequence[str] = (),
    timeout: float | None = None,
    check: bool = True,
    input: bytes | None = None,
    max_stdout: int | None = None,
    redactor: Redactor | None = None,
    as_sidecar: bool = False,
) -> GitResult:
    """Run ``git <hardening -c options> <args>`` in its own process group.

    ``config`` adds ``-c`` items (not secret: visible in ``ps``). Raises :class:`GitTimeout` after
    ``timeout`` seconds (default ``settings.local_timeout``; the process group is killed and reaped),
    and :class:`GitError` with git's redacted stderr when the exit code is not 0 and ``check`` is
    true. Cancellation kills the process too.

    With ``settings.agent`` set, git runs as the agent's user (commands in workspaces) unless
    ``as_sidecar`` (commands in the sidecar's own mirrors); credentials are refused for the agent's
    user, whose other processes could read them.
    """
    settings = settings or GitSettings()
    redactor = redactor or default_redactor
    config_items = config
    timeout = settings.local_timeout if timeout is None else timeout
    extra = dict(env or {})
    config = git_config_args(settings)
    for item in config_items:
        config += ["-c", item]
    agent = None if as_sidecar else settings.agent
    if credentials is not None and credentials.active:
        if agent is not None:
            raise RuntimeError("a git token must not reach a process of the agent's user (use the mirror)")
        extra.update(credentials.env)
        config += credentials.config
    argv = ["git", *config, *args]
    what = next((a for a in args if not a.startswith("-")), "git")
    child_env = git_env(settings, extra)
    spawn: dict[str, object] = {}
    if agent is not None:
        for name in ("XDG_CONFIG_HOME", "SSH_AUTH_SOCK", "SSH_AGENT_PID"):
            child_env.pop(name, None)
        child_env["HOME"] = str(agent.home("git"))
        child_env["GIT_CONFIG_GLOBAL"] = str(agent.git_config)
        spawn = agent.spawn_options()
    elif as_sidecar and settings.agent is not None:
        spawn = {"umask": 0o022}  # the agent's git reads the mirror
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=str(cwd) if cwd is not None else None,
            env=child_env,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            **spawn,  # type: ignore[arg-type]
        )
    except OSError as exc:
        raise GitError(f"cannot run git {what}: {exc.strerror}", redactor=redactor) from None

    async def feed() -> None:
        if input is not None and proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(input)
                await proc.stdin.drain()
            proc.stdin.close()

    async def communicate() -> tuple[tuple[bytes, bool], tuple[bytes, bool]]:
        _, out, err, _ = await asyncio.gather(
            feed(), _read_capped(proc.stdout, max_stdout), _read_capped(proc.stderr, _STDERR_LIMIT), proc.wait()
        )
        return out, err

    try:
        (out, truncated), (err, _) = await asyncio.wait_for(communicate(), timeout)
    except TimeoutError:
        # git starts helpers (git-remote-https, ssh, index-pack) in its process group: kill them all.
        kill_group(proc.pid)
        await proc.wait()
        raise GitTimeout(f"git {what} timed out after {timeout:g} s and was stopped", redactor=redactor) from None
    except BaseException:
        kill_group(proc.pid)
        with logged_suppress(f"reaping git {what}", log):
            await asyncio.shield(proc.wait())
        raise
    result = GitResult(
        code=proc.returncode if proc.returncode is not None else -1,
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        truncated=truncated,
    )
    if check and result.code != 0:
        raise GitError(
            f"git {what} failed: {summarize_stderr(result.stderr) or f'exit code {result.code}'}",
            stderr=result.stderr,
            code=result.code,
            redactor=redactor,
        )
    return result


#: Known failures and what to tell the user about them.
_HINTS = (
    (("Authentication failed", "could not read Username", "could not read Password", "terminal prompts disabled",
      "HTTP Basic: Access denied", "The requested URL returned error: 401", "The requested URL returned error: 403"),
     "authentication failed: the token is missing, wrong, or has no access to this repository"),
    (("Could not resolve host", "Connection refused", "Failed to connect", "Connection timed out"),
     "the git server cannot be reached"),
    (("Repository not found", "does not appear to be a git repository", "The requested URL returned error: 404"),
     "the repository does not exist (or the token cannot see it)"),
    (("Host key verification failed", "Permission denied (publickey"),
     "ssh authentication failed (host key or key pair)"),
)


def summarize_stderr(stderr: str, limit: int = 600) -> str:
    """The useful lines of git's stderr (``fatal:``/``error:`` first), short enough for a message, with a
    plain-words hint for well-known failures."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    chosen = [line for line in lines if line.startswith(("fatal:", "error:"))] or lines
    text = "; ".join(chosen)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    for needles, hint in _HINTS:
        if any(needle in stderr for needle in needles):
            return f"{hint} ({text})"
    return text
