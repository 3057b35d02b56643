"""JetStream delivery: the embedded nats-server, the stream/consumer/bucket set-up, and the worker
that pulls tasks, runs them through the pipeline and publishes one result each (with its cancel
registry, the workspace-operations server and dead letters)."""

from .cancel import CancelRegistry
from .deadletter import DeadLetters
from .journal import ResultJournal, ensure_result_journal
from .natsd import EmbeddedNats
from .ops_server import OpsServer
from .setup import Buckets, ensure_buckets, ensure_consumer, ensure_dead_letter_stream, ensure_task_stream
from .worker import Worker

__all__ = [
    "Buckets",
    "CancelRegistry",
    "DeadLetters",
    "EmbeddedNats",
    "OpsServer",
    "ResultJournal",
    "Worker",
    "ensure_buckets",
    "ensure_consumer",
    "ensure_dead_letter_stream",
    "ensure_result_journal",
    "ensure_task_stream",
]
