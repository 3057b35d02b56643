"""Running the agent under a user of its own (``agent_user``), apart from the sidecar's secrets.

By default the agent (OpenCode and the commands its tools run, ``opencode run``, ``claude``) runs as
the sidecar's user and can read what that user can: the configuration file, NATS credentials, the
embedded JetStream store in ``data_dir``. With ``agent_user`` set, the sidecar, which must then run
as root (in its container), starts every agent process as that user and keeps its own files out of
its reach:

- ``data_dir`` is ``0711`` (the agent may pass through it, not list it) and everything the sidecar
  keeps there is private to it (the sidecar runs with umask ``077``); the agent's homes
  (:meth:`AgentUser.home`) and the engines' state folders are the only folders in it the agent owns.
- Workspaces, and every file the sidecar puts in them, belong to the agent's user. Every git
  command in a workspace runs as that user too: git in a repository someone else controls can be
  made to run commands (filters, ``textconv``, ``core.*`` settings), so root never runs git there.
- A git token never reaches a process of the agent's user (it could read that process's
  environment): clone, fetch and push go through a mirror only the sidecar writes
  (:mod:`ocbridge.bridge.workspace.git.mirror`).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

_NUMERIC = re.compile(r"(\d+)(?::(\d+))?")


class AgentUserError(ValueError):
    """``agent_user`` names no usable user, or the sidecar cannot switch to it."""


@dataclass(frozen=True, slots=True)
class AgentUser:
    """The user agent processes run as, and the folders laid out for it."""

    uid: int
    gid: int
    #: The sidecar's private state (``data_dir``): homes and mirrors live under it.
    data_dir: Path

    @property
    def mirror_root(self) -> Path:
        """Where the sidecar keeps the git mirrors workspaces fetch from (sidecar-owned)."""
        return self.data_dir / "git-mirrors"

    @property
    def git_config(self) -> Path:
        """The global git config of the agent's git (sidecar-owned, readable by the agent): it
        trusts the sidecar's mirrors. (``-c safe.directory`` would not reach the ``upload-pack``
        git runs for a local remote: git clears ``GIT_CONFIG_PARAMETERS`` for it.)"""
        return self.data_dir / "agent-gitconfig"

    def home(self, name: str) -> Path:
        """An agent-owned folder under ``data_dir`` (HOME of one engine, or of git)."""
        return self.data_dir / "agent" / name

    def spawn_options(self) -> dict[str, Any]:
        """Keyword arguments for ``create_subprocess_exec`` that start a process as this user:
        no supplementary groups (root's would stay otherwise) and a private umask."""
        return {"user": self.uid, "group": self.gid, "extra_groups": [], "umask": 0o077}

    def own(self, path: Path) -> None:
        """Give ``path`` itself (never a link's target) to the agent's user."""
        os.lchown(path, self.uid, self.gid)

    def own_tree(self, path: Path) -> None:
        """Give ``path`` and everything under it to the agent's user, following no link."""
        self.own(path)
        for parent, dirs, files in os.walk(path, followlinks=False):
            for name in (*dirs, *files):
                with contextlib.suppress(FileNotFoundError):
                    os.lchown(os.path.join(parent, name), self.uid, self.gid)

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A private temporary folder the agent's git may write (a throwaway index, a bundle),
        removed on the way out."""
        folder = Path(tempfile.mkdtemp(prefix="scratch-", dir=self.home("git")))
        try:
            self.own(folder)
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def prepare(self) -> None:
        """Lay out ``data_dir`` (``0711``, sidecar-owned) with the agent's folder in it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.data_dir, os.geteuid(), os.getegid())
        self.data_dir.chmod(0o711)
        # What earlier runs left (a JetStream store, logs) with other modes: closed at the top,
        # since the agent knows the layout and may pass through data_dir.
        for child in self.data_dir.iterdir():
            info = child.lstat()
            if info.st_uid != self.uid and not stat.S_ISLNK(info.st_mode):
                child.chmod(stat.S_IMODE(info.st_mode) & ~0o077)
        self.mirror_root.mkdir(exist_ok=True)
        self.mirror_root.chmod(0o711)
        self.git_config.write_text("[safe]\n\tdirectory = *\n")
        self.git_config.chmod(0o644)
        agent = self.data_dir / "agent"
        agent.mkdir(exist_ok=True)
        agent.chmod(0o711)
        self.make_home("git")

    def reach(self, path: Path, root: Path) -> None:
        """Let the agent's user pass through the folders between ``root`` and ``path`` (the parents
        of a nested workspace the sidecar created with its private umask)."""
        for parent in path.parents:
            if parent == root or root not in parent.parents:
                return
            info = parent.lstat()
            if info.st_uid != self.uid and not info.st_mode & stat.S_IXOTH:
                parent.chmod(stat.S_IMODE(info.st_mode) | 0o711)

    def make_home(self, name: str) -> Path:
        """Create (if needed) the agent-owned home ``name``; returns its path."""
        home = self.home(name)
        home.mkdir(parents=True, exist_ok=True)
        self.own_tree(home)
        home.chmod(stat.S_IRWXU)
        return home


def open_agent_file(path: Path) -> BinaryIO:
    """Open for reading a file in a folder the agent writes (its state, a log, a workspace) without
    following a link it may have put there: the sidecar may read what the agent's user cannot.
    Raises :class:`OSError` (``ELOOP`` for a link) like :func:`open`."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def copy_agent_file(source: Path, target: Path, *, owner: AgentUser | None = None,
                    keep_times: bool = False) -> None:
    """Copy a file the agent wrote (:func:`open_agent_file`) to a new ``target``, given to
    ``owner`` and with the source's times when asked (through the new file's descriptor: its
    folder may be the agent's, which could put a link in its place meanwhile)."""
    with open_agent_file(source) as src, open(target, "xb") as dst:
        shutil.copyfileobj(src, dst)
        dst.flush()
        if keep_times:
            times = os.fstat(src.fileno())
            os.utime(dst.fileno(), ns=(times.st_atime_ns, times.st_mtime_ns))
        if owner is not None:
            os.fchown(dst.fileno(), owner.uid, owner.gid)


def resolve_agent_user(spec: str, data_dir: Path) -> AgentUser:
    """The :class:`AgentUser` for ``spec``: a user name, or ``uid[:gid]``.

    Refuses root and the sidecar's own user (no separation), and a sidecar that cannot switch
    users (not running as root).
    """
    spec = spec.strip()
    match = _NUMERIC.fullmatch(spec)
    if match:
        uid = int(match.group(1))
        if match.group(2) is not None:
            gid = int(match.group(2))
        else:
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = uid
    else:
        try:
            entry = pwd.getpwnam(spec)
        except KeyError:
            raise AgentUserError(f"agent_user {spec!r}: no such user") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if uid == 0 or gid == 0:
        raise AgentUserError(f"agent_user {spec!r} is root: the agent would reach everything the sidecar keeps")
    if uid == os.geteuid():
        raise AgentUserError(f"agent_user {spec!r} is the sidecar's own user: nothing would be kept apart")
    if os.geteuid() != 0:
        raise AgentUserError(
            f"agent_user {spec!r} needs the sidecar to run as root (in its container) to start agent "
            f"processes as that user; it runs as uid {os.geteuid()}"
        )
    return AgentUser(uid=uid, gid=gid, data_dir=data_dir.resolve())


def describe(user: AgentUser) -> str:
    """``name (uid N)`` for logs."""
    try:
        name = pwd.getpwuid(user.uid).pw_name
    except KeyError:
        name = str(user.uid)
    with contextlib.suppress(KeyError):
        return f"{name} (uid {user.uid}, group {grp.getgrgid(user.gid).gr_name})"
    return f"{name} (uid {user.uid}, gid {user.gid})"
