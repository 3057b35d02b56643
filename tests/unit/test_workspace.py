"""Workspace names, input files and stored workspace paths can never reach outside the workspace
root, symlinks included (real files, folders and links on disk)."""

import os
from pathlib import Path

import pytest

from ocbridge.bridge.workspace.paths import (
    WorkspaceError,
    confine,
    open_workspace,
    remove_tree,
    resolve_workspace_path,
    write_file,
)


def test_bare_names_and_paths_inside_the_root(tmp_path):
    root = tmp_path / "root"
    assert resolve_workspace_path(root, "repo-ws") == root.resolve() / "repo-ws"
    assert resolve_workspace_path(root, str(root / "a" / "b")) == root.resolve() / "a" / "b"


def test_absolute_paths_outside_the_root_are_re_rooted(tmp_path):
    root = tmp_path / "root"
    path = resolve_workspace_path(root, "/workspaces/station-coding/ws_1736")
    assert path == root.resolve() / "workspaces" / "station-coding" / "ws_1736"


@pytest.mark.parametrize("name", ["../x", "a/../../b", "/etc/../..", "", ".", "a\x00b", "./"])
def test_escapes_and_empty_names_are_refused(tmp_path, name):
    with pytest.raises(WorkspaceError):
        resolve_workspace_path(tmp_path, name)


def test_symlink_leading_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(WorkspaceError):
        open_workspace(root, "link")
    assert list(outside.iterdir()) == []


def test_open_reports_created_then_reused(tmp_path):
    first = open_workspace(tmp_path, "ws")
    second = open_workspace(tmp_path, "ws")
    assert first.created and not second.created
    assert first.path == second.path and first.path.is_dir()


# ----------------------------------------------------------------------- symlinks and stored paths


@pytest.fixture
def layout(tmp_path):
    """A workspace root and, next to it, a folder standing for everything outside the root."""
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("keep me\n")
    return root, outside


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` with its content (``None`` for folders), links not followed."""
    entries: dict[str, bytes | None] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        entries[rel] = None if path.is_dir() and not path.is_symlink() else (
            os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
    return entries


def test_a_symlinked_workspace_name_never_creates_anything_outside(layout):
    root, outside = layout
    before = snapshot(outside)
    os.symlink(outside, root / "link")
    for name in ("link/sub", "link/a/b/c", str(root / "link" / "deep"), "/link/x"):
        with pytest.raises(WorkspaceError, match="outside the workspace root"):
            open_workspace(root, name)
    assert snapshot(outside) == before


def test_a_dangling_symlink_is_refused_and_its_target_not_created(layout):
    root, outside = layout
    os.symlink(outside / "missing", root / "dangling")
    with pytest.raises(WorkspaceError):
        open_workspace(root, "dangling/ws")
    assert not (outside / "missing").exists()
    os.symlink(root / "gone", root / "inner-dangling")
    with pytest.raises(WorkspaceError, match="missing folder"):
        open_workspace(root, "inner-dangling")
    assert not (root / "gone").exists()


def test_a_symlink_that_stays_inside_the_root_is_followed_to_its_real_path(layout):
    root, _ = layout
    (root / "real").mkdir()
    os.symlink(root / "real", root / "alias")
    workspace = open_workspace(root, "alias/ws")
    assert workspace.path == root.resolve() / "real" / "ws" and workspace.path.is_dir() and workspace.created
    os.symlink(".", root / "self")
    with pytest.raises(WorkspaceError, match="root itself"):
        open_workspace(root, "self")
    (root / "repo" / ".git").mkdir(parents=True)
    os.symlink(root / "repo" / ".git", root / "git-alias")
    with pytest.raises(WorkspaceError, match=r"'\.git' folder"):
        open_workspace(root, "git-alias/hooks")
    assert not (root / "repo" / ".git" / "hooks").exists()


@pytest.mark.parametrize("name", ["repo/.git", "repo/.git/hooks", ".GIT/x", "a/" + "x" * 256, "\udc80"])
def test_names_reaching_into_git_folders_or_unusable_on_disk_are_refused(tmp_path, name):
    with pytest.raises(WorkspaceError):
        open_workspace(tmp_path / "root", name)
    assert not (tmp_path / "root" / "repo").exists()


def test_a_component_that_is_a_file_is_refused_clearly(layout):
    root, _ = layout
    (root / "file").write_text("x")
    with pytest.raises(WorkspaceError, match="not a folder"):
        open_workspace(root, "file/ws")


def test_confine_checks_stored_paths_lexically_then_for_real(layout):
    root, outside = layout
    (root / "ws").mkdir()
    os.symlink(outside, root / "escape")
    assert confine(root, str(root / "ws")) == root.resolve() / "ws"
    assert confine(root, str(root / "not-yet")) == root.resolve() / "not-yet"  # may be gone already
    for stored in (str(outside), "/etc", str(root / ".." / "outside"), "relative/ws", "", str(root),
                   str(root / "escape"), str(root / "escape" / "sub"), str(root / "ws" / ".git"), "/a\x00b"):
        with pytest.raises(WorkspaceError):
            confine(root, stored)


def test_write_file_never_follows_a_link_on_any_component(layout):
    root, outside = layout
    ws = open_workspace(root, "ws").path
    before = snapshot(outside)
    os.symlink(outside, ws / "docs")
    os.symlink(outside / "secret.txt", ws / "notes.txt")
    os.symlink(outside / "new.txt", ws / "dangling.txt")
    with pytest.raises(WorkspaceError, match="symbolic link 'docs'"):
        write_file(ws, "docs/id_rsa", b"pwned")
    with pytest.raises(WorkspaceError, match="symbolic link"):
        write_file(ws, "notes.txt", b"pwned")
    with pytest.raises(WorkspaceError, match="symbolic link"):
        write_file(ws, "dangling.txt", b"pwned")
    with pytest.raises(WorkspaceError, match=r"'\.git'"):
        write_file(ws, ".git/config", b"[core]\n")
    assert snapshot(outside) == before
    assert not list(ws.glob(".ocbridge-*"))  # no temporary file left behind


def test_write_file_replaces_a_hard_link_instead_of_writing_through_it(layout):
    root, outside = layout
    ws = open_workspace(root, "ws").path
    os.link(outside / "secret.txt", ws / "linked.txt")
    (ws / "script.sh").write_text("old")
    (ws / "script.sh").chmod(0o750)
    assert write_file(ws, "linked.txt", b"new\n") == "linked.txt"
    assert write_file(ws, "/script.sh", b"echo hi\n") == "script.sh"  # absolute: re-rooted in the workspace
    assert write_file(ws, "deep/er/file.txt", b"x") == "deep/er/file.txt"
    assert (outside / "secret.txt").read_text() == "keep me\n"
    assert (ws / "linked.txt").read_bytes() == b"new\n"
    assert (ws / "script.sh").stat().st_mode & 0o777 == 0o750
    assert (ws / "deep" / "er" / "file.txt").read_bytes() == b"x"


def test_remove_tree_deletes_only_under_the_root(layout):
    root, outside = layout
    ws = open_workspace(root, "team/ws").path
    (ws / "file").write_text("x")
    os.symlink(outside, ws / "out")  # a link inside the tree is removed, never followed
    errors: list[str] = []
    assert remove_tree(root, ws, lambda p, e: errors.append(p)) is True
    assert not ws.exists() and (root / "team").is_dir() and errors == []
    assert remove_tree(root, ws, lambda p, e: errors.append(p)) is False  # already gone
    os.symlink(outside, root / "escape")
    for target in (outside, root / "escape", root / "escape" / "x", root):
        with pytest.raises(WorkspaceError):
            remove_tree(root, target, lambda p, e: errors.append(p))
    assert (outside / "secret.txt").read_text() == "keep me\n"


def test_files_the_agent_writes_are_read_without_following_links_or_blocking(tmp_path):
    from ocbridge.bridge.agent_user import open_agent_file

    secret = tmp_path / "sidecar-only.txt"
    secret.write_text("secret")
    (tmp_path / "transcript.jsonl").symlink_to(secret)
    with pytest.raises(OSError):
        open_agent_file(tmp_path / "transcript.jsonl")
    os.mkfifo(tmp_path / "log.fifo")  # opening a FIFO for reading would wait for a writer
    with pytest.raises(OSError, match="not a regular file"):
        open_agent_file(tmp_path / "log.fifo")
    (tmp_path / "plain.log").write_bytes(b"line\n")
    with open_agent_file(tmp_path / "plain.log") as handle:
        assert handle.read() == b"line\n"
