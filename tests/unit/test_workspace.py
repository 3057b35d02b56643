"""Workspace names can never reach outside the workspace root."""

import os

import pytest

from ocbridge.bridge.workspace.paths import WorkspaceError, open_workspace, resolve_workspace_path


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
