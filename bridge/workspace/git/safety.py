"""What a task may ask git to do: URL, branch, ref and remote checks, and git URL redaction.

Everything here runs before any git command that touches the network or a repository, so a refused
input never reaches git (``ext::sh -c ...`` would otherwise run a command, ``--upload-pack=...`` would
be read as an option).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import SplitResult, urlsplit, urlunsplit

from ocbridge.bridge.redact import Redactor

from .errors import GitInputError
from .runner import run_git
from .settings import GitSettings

UrlKind = Literal["https", "http", "ssh", "git", "file"]

# ``<transport>::<address>`` makes git run ``git-remote-<transport>`` (ext:: runs any command).
_HELPER_SYNTAX = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*::")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# scp-like ssh syntax ``[user@]host:path``: a colon before any slash.
_SCP = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>\[[^\]/]+\]|[^@/:\[\]]+):(?P<path>.*)$")
_SCHEME_ALIASES = {"git+ssh": "ssh", "ssh+git": "ssh"}
_DEFAULT_PORTS = {"https": 443, "http": 80, "ssh": 22, "git": 9418}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A full or abbreviated object id: sha1 (40) or sha256 (64) hex digits, at least 4 as git requires.
_OBJECT_ID = re.compile(r"[0-9a-fA-F]{4,64}")


def looks_like_object_id(ref: str) -> bool:
    """Whether ``ref`` has the shape of a (possibly abbreviated) commit id rather than a ref name."""
    return _OBJECT_ID.fullmatch(ref) is not None


@dataclass(frozen=True, slots=True)
class RemoteUrl:
    """A checked remote URL, without credentials."""

    #: What git is given, and what ends up in ``.git/config``: never holds a password or token.
    url: str
    kind: UrlKind
    #: A password (or, for http(s), a lone user name) that was in the URL: to be used as the token.
    secret: str | None = None
    #: User name that came with that password (sent with the token instead of the default one).
    username: str | None = None

    @property
    def origin(self) -> str | None:
        """``scheme://host[:port]`` as git's credential protocol names it (http(s) only)."""
        if self.kind not in ("https", "http"):
            return None
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        return f"{self.kind}://{host}:{parts.port}" if parts.port else f"{self.kind}://{host}"


def _netloc(parts: SplitResult, *, user: str | None) -> str:
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{user}@{netloc}" if user else netloc


def parse_remote_url(url: str, settings: GitSettings, *, redactor: Redactor | None = None) -> RemoteUrl:
    """Check ``url`` against the settings and lift any credentials out of it.

    Accepted: ``https``/``http``/``ssh``/``git`` URLs whose scheme is in ``settings.allowed_schemes``,
    scp-like ``user@host:path`` (as ssh), and ``file://`` URLs or absolute local paths only with
    ``settings.allow_file_urls``. Refused: remote-helper syntax (``ext::``, ``fd::``, any ``x::``),
    other schemes, anything starting with ``-``, control characters, hosts or users starting with ``-``.
    """

    def refuse(reason: str) -> GitInputError:
        return GitInputError(f"git URL {redact_git_url(url)!r} refused: {reason}", redactor=redactor)

    if not isinstance(url, str) or not url.strip():
        raise GitInputError("git URL is empty", redactor=redactor)
    if url != url.strip() or _CONTROL.search(url):
        raise refuse("it contains whitespace at its ends or control characters")
    if url.startswith("-"):
        raise refuse("it starts with '-' (it would be read as an option)")
    if _HELPER_SYNTAX.match(url):
        raise refuse("'<transport>::' remote helpers (ext::, fd::, ...) can run commands and are never allowed")
    match = _SCHEME.match(url)
    if match:
        scheme = _SCHEME_ALIASES.get(match.group(1).lower(), match.group(1).lower())
        if scheme == "file":
            if not settings.allow_file_urls:
                raise refuse("file:// URLs are not allowed (git.allow_file_urls is off)")
            return RemoteUrl(url=url, kind="file")
        if scheme not in settings.allowed_schemes:
            allowed = ", ".join(settings.allowed_schemes) or "none"
            raise refuse(f"transport {scheme!r} is not allowed (allowed: {allowed})")
        return _parse_network_url(url, scheme, refuse)
    scp = _SCP.match(url)
    if scp and "/" not in url.split(":", 1)[0]:
        if "ssh" not in settings.allowed_schemes:
            raise refuse("ssh (scp-like user@host:path) is not allowed")
        if scp.group("host").startswith("-") or (scp.group("user") or "").startswith("-"):
            raise refuse("host or user starts with '-'")
        if " " in url:
            raise refuse("it contains spaces")
        return RemoteUrl(url=url, kind="ssh")
    if not settings.allow_file_urls:
        raise refuse("local paths are not allowed (git.allow_file_urls is off)")
    if not os.path.isabs(url):
        raise refuse("a local repository must be given as an absolute path")
    return RemoteUrl(url=url, kind="file")


def _parse_network_url(url: str, scheme: str, refuse) -> RemoteUrl:
    if any(c.isspace() for c in url):
        raise refuse("it contains spaces")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a non-numeric port
    except ValueError as exc:
        raise refuse(f"it is not a valid URL ({exc})") from None
    host = parts.hostname or ""
    if not host:
        raise refuse("it has no host")
    if host.startswith("-") or (parts.username or "").startswith("-"):
        raise refuse("host or user starts with '-'")
    secret = username = None
    user = parts.username
    if scheme in ("https", "http"):
        # Credentials never stay in the URL (it would be written to .git/config): the password, or a
        # lone user name as in https://<token>@github.com, becomes the token.
        if parts.password:
            secret, username = parts.password, parts.username or None
        elif parts.username:
            secret = parts.username
        user = None
    clean = urlunsplit((scheme, _netloc(parts, user=user), parts.path, parts.query, parts.fragment))
    return RemoteUrl(url=clean, kind=scheme, secret=secret, username=username)  # type: ignore[arg-type]


def redact_git_url(url: str) -> str:
    """A git remote URL without its credentials: the password goes, and for http(s) the user name too
    (``https://<token>@host`` puts the token there); an ssh login (``ssh://git@host``) is kept, as it
    is part of the address. The result is still a usable URL (shown in events, compared with the
    configured one), which is why this is not :func:`ocbridge.client.connection.redact_nats_url` (NATS
    server lists, ``***@`` marker)."""
    if not isinstance(url, str):
        return ""
    match = _SCHEME.match(url)
    if not match or "@" not in url:
        return url
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        return re.sub(r"//[^/@]*@", "//***@", url, count=1)
    if parts.username is None and parts.password is None:
        return url
    keep_user = match.group(1).lower() not in ("http", "https") and parts.username
    return urlunsplit((parts.scheme, _netloc(parts, user=parts.username if keep_user else None),
                       parts.path, parts.query, parts.fragment))


def normalize_url(url: str) -> str:
    """A comparable form of a remote URL: no credentials, lower-case scheme and host, no default port,
    no trailing ``/`` or ``.git``; scp-like ssh as ``ssh://host/path``; local paths resolved."""
    match = _SCHEME.match(url)
    if match:
        scheme = _SCHEME_ALIASES.get(match.group(1).lower(), match.group(1).lower())
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return url
        if scheme == "file":
            return "file://" + os.path.realpath(parts.path).rstrip("/")
        host = (parts.hostname or "").lower()
        netloc = host if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"
        return f"{scheme}://{netloc}/{_strip_path(parts.path)}"
    scp = _SCP.match(url)
    if scp and "/" not in url.split(":", 1)[0]:
        return f"ssh://{scp.group('host').lower()}/{_strip_path(scp.group('path'))}"
    return "file://" + os.path.realpath(url).rstrip("/")


def _strip_path(path: str) -> str:
    path = path.strip("/")
    path = path.removesuffix(".git")
    return path.rstrip("/")


def _check_name(name: str, what: str, *, redactor: Redactor | None) -> None:
    if not isinstance(name, str) or not name:
        raise GitInputError(f"{what} name is empty", redactor=redactor)
    if name.startswith("-"):
        raise GitInputError(f"{what} {name!r} refused: it starts with '-'", redactor=redactor)
    if len(name) > 255 or _CONTROL.search(name) or any(c.isspace() for c in name):
        raise GitInputError(f"{what} {name[:80]!r} refused: too long, or has spaces or control characters",
                            redactor=redactor)


async def _check_ref_format(full: str, name: str, what: str, *, redactor: Redactor | None) -> None:
    # The argument starts with "refs/", so git can never read it as an option.
    result = await run_git(["check-ref-format", full], cwd="/", check=False, redactor=redactor)
    if result.code != 0:
        raise GitInputError(f"{what} {name!r} refused: not a valid git ref name", redactor=redactor)


async def check_branch_name(name: str, *, redactor: Redactor | None = None) -> str:
    """Refuse a branch name that git would not accept as ``refs/heads/<name>`` or that starts with ``-``."""
    _check_name(name, "branch", redactor=redactor)
    if name == "HEAD" or name.startswith("refs/"):
        raise GitInputError(f"branch {name!r} refused: reserved name", redactor=redactor)
    await _check_ref_format(f"refs/heads/{name}", name, "branch", redactor=redactor)
    return name


async def check_ref(ref: str, *, redactor: Redactor | None = None) -> str:
    """Refuse a ``ref`` (commit id, tag or branch) that is not a hex id nor a valid ref name."""
    _check_name(ref, "ref", redactor=redactor)
    if looks_like_object_id(ref):
        return ref
    full = ref if ref.startswith("refs/") else f"refs/tags/{ref}"
    await _check_ref_format(full, ref, "ref", redactor=redactor)
    return ref


async def check_remote_name(name: str, *, redactor: Redactor | None = None) -> str:
    """Refuse a remote name that is not a plain, valid name (a URL is not a remote name here)."""
    _check_name(name, "remote", redactor=redactor)
    if ":" in name or "/" in name:
        raise GitInputError(f"remote {name!r} refused: give the name of a configured remote", redactor=redactor)
    await _check_ref_format(f"refs/remotes/{name}", name, "remote", redactor=redactor)
    return name
