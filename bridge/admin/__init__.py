"""Operator commands that act on NATS before or beside any sidecar: ``ocbridge init`` and ``ocbridge doctor``."""
