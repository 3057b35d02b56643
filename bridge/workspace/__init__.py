"""Workspaces: folders confined under the root, getting them ready (git, input files), reporting
what a task changed, and deleting them when their policy says so."""
