"""Test helpers (not tests): git server, stack helpers, sample data."""
