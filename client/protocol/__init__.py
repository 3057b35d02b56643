"""The wire contract between Station, the client and the sidecar: every message model, the names
of subjects, streams and buckets, and KV key rules. Pure data: no I/O, and nothing here imports the
client or the sidecar."""

from .models import *  # noqa: F403
from .models import __all__ as _models_all
from .naming import Naming, naming_from_env

__all__ = [*_models_all, "Naming", "naming_from_env"]
