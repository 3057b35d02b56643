"""Workspace folders and the files placed in them, confined under the sidecar's workspace root.

Station sends either a bare name (``repo-ws``) or an absolute path from its own file system
(``/workspaces/station-coding/ws_1736...``). A path inside the root is used as is; any other
absolute path is re-rooted under the root (``/tmp/x`` -> ``<root>/tmp/x``), so nothing can point
outside. ``..`` components, ``.git`` components (a workspace or an input file inside a repository's
own ``.git`` folder would let a task rewrite its config and hooks) and NUL are refused.

Symlinks. A name is checked before anything touches the disk, and then followed on the disk one
component at a time through directory file descriptors, so the check and the use cannot drift
apart:

- :func:`open_workspace` creates missing folders with ``mkdirat`` under the folder it already holds
  open; a symlink on the way is followed only when its real target is under the real root (a link
  ``root/out -> /home/u`` never gets a folder created in ``/home/u``).
- :func:`write_file` (a task's input files) never follows a link on any component, and replaces the
  target by a rename, so neither a symlink nor a hard link left in the workspace by the agent or a
  cloned repository can make it write elsewhere.
- :func:`confine` checks a path read back from a store (a session's ``workspacePath``): lexically
  first (nothing outside the root is even looked at), then by its real path.
- :func:`remove_tree` deletes a workspace through descriptors opened without following links.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ocbridge.client.protocol import ErrorType, OcbridgeError

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
#: Longest file name (one path component) the common Linux file systems accept, in bytes.
_MAX_COMPONENT = 255


class WorkspaceError(OcbridgeError, ValueError):
    """The workspace name is unusable (escapes the root, empty, ...)."""

    default_error_type = ErrorType.INVALID_TASK


@dataclass(frozen=True, slots=True)
class Workspace:
    name: str
    path: Path
    created: bool


def _short(name: str) -> str:
    return repr(name if len(name) <= 120 else name[:120] + "...")


def _inside(root: Path, path: Path) -> bool:
    """``path`` is strictly below ``root`` (both absolute and normalised)."""
    return path != root and root in path.parents


def relative_parts(
    base: Path, name: str, what: str = "workspace name", base_is: str = "the workspace root"
) -> list[str]:
    """The components of ``name`` below ``base``, checked without touching the disk.

    An absolute ``name`` inside ``base`` is taken relative to it, any other absolute name is
    re-rooted under it. Raises :class:`WorkspaceError` for an empty name, NUL, text that is not
    UTF-8, ``..``, a ``.git`` component, a component over 255 bytes, or a name that is ``base`` itself.
    """
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise WorkspaceError(f"{what} is empty or contains NUL")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise WorkspaceError(f"{what} {_short(name)} is not valid UTF-8 text") from None
    # POSIX keeps a leading "//" as a root of its own; it means "/" here.
    pure = PurePosixPath("/" + name.lstrip("/") if name.startswith("/") else name)
    if ".." in pure.parts:
        raise WorkspaceError(f"{what} {_short(name)} must not contain '..'")
    if pure.is_absolute():
        try:
            relative = pure.relative_to(PurePosixPath(base))
        except ValueError:
            relative = pure.relative_to("/")
    else:
        relative = pure
    parts = [p for p in relative.parts if p not in ("", ".")]
    if not parts:
        raise WorkspaceError(f"{what} {_short(name)} names {base_is} itself")
    for part in parts:
        if part.casefold() == ".git":
            raise WorkspaceError(f"{what} {_short(name)} must not reach into a '.git' folder")
        if len(part.encode()) > _MAX_COMPONENT:
            raise WorkspaceError(f"{what} {_short(name)} has a component longer than {_MAX_COMPONENT} bytes")
    return parts


def resolve_workspace_path(root: Path, name: str) -> Path:
    """Map a workspace name to an absolute path under ``root`` without touching the disk."""
    root = root.resolve()
    return root.joinpath(*relative_parts(root, name))


def confine(root: Path, path: str | Path, what: str = "workspace") -> Path:
    """The real path of ``path`` (a path read back from a store, which may not exist any more), when
    it lies strictly under the real workspace root; raises :class:`WorkspaceError` otherwise.

    The path is first checked as text (absolute, no NUL, under the root once normalised), so a
    foreign path is refused before anything outside the root is looked at; then its real path
    (symlinks followed) must be under the real root too, and free of ``.git`` components.
    """
    real_root = Path(os.path.realpath(root))
    text = os.fspath(path) if isinstance(path, Path | str) else ""
    if not text or "\x00" in text or not os.path.isabs(text):
        raise WorkspaceError(f"{what} path {_short(text)} is not an absolute path")
    lexical = Path(os.path.normpath(text))
    if not (_inside(real_root, lexical) or _inside(Path(os.path.abspath(root)), lexical)):
        raise WorkspaceError(f"{what} path {_short(text)} is outside the workspace root")
    real = Path(os.path.realpath(lexical))
    if not _inside(real_root, real):
        raise WorkspaceError(f"{what} path {_short(text)} resolves outside the workspace root (through a symlink)")
    if any(part.casefold() == ".git" for part in real.relative_to(real_root).parts):
        raise WorkspaceError(f"{what} path {_short(text)} is inside a '.git' folder")
    return real


# ------------------------------------------------------------------------------ descriptor walks


def _fd_path(fd: int) -> Path | None:
    """Where the folder open as ``fd`` really is (Linux), whatever path was used to open it."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def _enter(fd: int, part: str, here: Path, real_root: Path, *, follow: bool, what: str, name: str) -> tuple[int, Path]:
    """Open the sub-folder ``part`` of the folder open as ``fd`` (real path ``here``).

    Never follows a symlink blindly: without ``follow`` a link is refused; with it, the link is
    followed only when its real target is under ``real_root``, and the folder actually opened is
    checked again. Returns the new descriptor and its real path.
    """
    try:
        return os.open(part, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd), here / part
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise
    info = os.stat(part, dir_fd=fd, follow_symlinks=False)
    shown = "/".join((here / part).relative_to(real_root).parts) if _inside(real_root, here / part) else part
    if not stat.S_ISLNK(info.st_mode):
        raise WorkspaceError(f"{what} {_short(name)}: {shown!r} exists and is not a folder")
    if not follow:
        raise WorkspaceError(f"{what} {_short(name)} passes through the symbolic link {shown!r}: "
                             "refused (files are never written through links)")
    target = Path(os.path.realpath(here / part))
    if target != real_root and not _inside(real_root, target):
        raise WorkspaceError(f"{what} {_short(name)} resolves outside the workspace root "
                             f"(the symbolic link {shown!r} points out of it)")
    if any(p.casefold() == ".git" for p in target.relative_to(real_root).parts):
        raise WorkspaceError(f"{what} {_short(name)}: the symbolic link {shown!r} points into a '.git' folder")
    try:
        new = os.open(target, _DIR_FLAGS)
    except FileNotFoundError:
        raise WorkspaceError(f"{what} {_short(name)}: the symbolic link {shown!r} points to a missing folder") from None
    real = _fd_path(new) or target
    if real != real_root and not _inside(real_root, real):  # the link changed under our feet
        os.close(new)
        raise WorkspaceError(f"{what} {_short(name)} resolves outside the workspace root")
    return new, real


def _walk(fd: int, here: Path, real_root: Path, parts: list[str], *, create: bool, follow: bool, what: str,
          name: str, owner: tuple[int, int] | None = None) -> tuple[int, Path, bool]:
    """Descend from ``fd`` through ``parts`` (creating missing folders when ``create``, given to
    ``owner`` (uid, gid) when set); closes ``fd``. Returns the last descriptor, its real path and
    whether the last folder was created."""
    created = False
    try:
        for part in parts:
            created = False
            if create:
                try:
                    os.mkdir(part, dir_fd=fd)
                    created = True
                    if owner is not None:
                        os.chown(part, *owner, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
            new, here = _enter(fd, part, here, real_root, follow=follow, what=what, name=name)
            os.close(fd)
            fd = new
    except BaseException:
        os.close(fd)
        raise
    return fd, here, created


def open_workspace(root: Path, name: str) -> Workspace:
    """Create (or reuse) the workspace folder for ``name``; refuses symlink escapes before creating
    anything. The returned path is the folder's real path."""
    root.mkdir(parents=True, exist_ok=True)  # the root itself is the operator's
    real_root = Path(os.path.realpath(root))
    parts = relative_parts(real_root, name)
    fd, real, created = _walk(os.open(real_root, _DIR_FLAGS), real_root, real_root, parts, create=True,
                              follow=True, what="workspace name", name=name)
    os.close(fd)
    if real == real_root:
        raise WorkspaceError(f"workspace name {_short(name)} names the workspace root itself")
    return Workspace(name=name, path=real, created=created)


def write_file(workspace: Path, name: str, data: bytes, *, what: str = "input file",
               owner: tuple[int, int] | None = None) -> str:
    """Write ``data`` to ``<workspace>/<name>`` without following any link; returns the relative path.

    Missing folders are created; a symlink on any component (the file itself included) or a folder
    where the file should be is refused with :class:`WorkspaceError`. The file is written under a
    temporary name and renamed over the target, so a hard link left in the workspace is replaced,
    never written through. ``workspace`` must be a real path (as :func:`open_workspace` returns).
    ``owner`` (uid, gid) is given the file and the folders created for it (the agent's user).
    """
    base = Path(workspace)
    parts = relative_parts(base, name, what, "the workspace")
    fd, _, _ = _walk(os.open(base, _DIR_FLAGS | _NOFOLLOW), base, base, parts[:-1], create=True, follow=False,
                     what=what, name=name, owner=owner)
    try:
        final = parts[-1]
        try:
            info = os.stat(final, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            info = None
        if info is not None and stat.S_ISLNK(info.st_mode):
            raise WorkspaceError(f"{what} {_short(name)} is a symbolic link in the workspace: refused "
                                 "(files are never written through links)")
        if info is not None and not stat.S_ISREG(info.st_mode):
            raise WorkspaceError(f"{what} {_short(name)} exists in the workspace and is not a regular file")
        temporary = f".ocbridge-{secrets.token_hex(8)}.tmp"
        out = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                      0o666, dir_fd=fd)
        try:
            with os.fdopen(out, "wb") as handle:
                if owner is not None:
                    os.fchown(handle.fileno(), *owner)
                if info is not None:
                    os.fchmod(handle.fileno(), stat.S_IMODE(info.st_mode))
                handle.write(data)
            os.replace(temporary, final, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=fd)
            raise
    finally:
        os.close(fd)
    return "/".join(parts)


def remove_tree(root: Path, path: str | Path, on_error: Callable[[str, BaseException], None]) -> bool:
    """Delete the workspace folder ``path`` (confined with :func:`confine`) and everything in it.

    The parent folder is reached through descriptors opened without following links and the tree is
    removed relative to it (``shutil.rmtree`` with ``dir_fd``, which never follows links inside), so a
    link swapped in on the way cannot redirect the deletion. Returns ``False`` when there was nothing
    to delete. Entries that cannot be removed are reported to ``on_error(path, exc)``.
    """
    real_root = Path(os.path.realpath(root))
    real = confine(root, path)
    parts = list(real.relative_to(real_root).parts)
    fd, _, _ = _walk(os.open(real_root, _DIR_FLAGS), real_root, real_root, parts[:-1], create=False, follow=False,
                     what="workspace", name=str(path))
    try:
        try:
            info = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(info.st_mode):
            raise WorkspaceError(f"workspace {_short(str(path))} is not a folder: not deleted")

        if sys.version_info >= (3, 12):
            shutil.rmtree(parts[-1], dir_fd=fd, onexc=lambda _f, failed, exc: on_error(str(failed), exc))
        else:
            shutil.rmtree(parts[-1], dir_fd=fd, onerror=lambda _f, failed, info: on_error(str(failed), info[1]))
        return True
    finally:
        os.close(fd)
