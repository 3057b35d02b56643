"""The pipeline without NATS: a runner for tasks and operations in this process, and the Station
backends (``opencode``, ``opencode-cli``, ``claudecode``) built on it."""
