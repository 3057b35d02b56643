"""Which models.dev catalog OpenCode reads (``OPENCODE_MODELS_PATH``).

OpenCode builds its provider list from a catalog of every provider models.dev knows (a snapshot
built into the binary when fetching is off) and converts all of it again for each directory
instance it loads, whatever ``enabled_providers`` says: measured with 1.18.33 on 2 cores
(``bench/cold_instances.py``), half to two thirds of the CPU a new directory costs (2.2-2.6 s on
average with OpenCode's catalog, 0.84-0.96 s with an empty one). A deployment whose enabled
providers are all defined in its own config (a self-hosted or proxy endpoint, the offline model)
needs none of it, and a sidecar pays that cost for every workspace after each OpenCode start
(``opencode run`` pays it on every run).

Choices (``models_catalog`` of the ``opencode`` and ``opencode-cli`` sections):

- ``auto`` (default): an empty catalog when the config names ``enabled_providers`` and defines
  each of them itself (``npm`` package and ``models``); otherwise OpenCode's own.
- ``bundled``: OpenCode's own, always.
- ``none``: an empty catalog; only providers the config defines exist.
- a path: that file (models.dev's ``api.json`` format), e.g. a pinned copy trimmed to the
  providers in use; checked to be a readable JSON object when the engine starts, since OpenCode
  would quietly fall back to its own on a bad file.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from ..base import EngineError

#: File name of the empty catalog an engine writes next to its state.
EMPTY_CATALOG_NAME = "models-catalog-empty.json"


def defines_every_enabled_provider(config: dict[str, Any]) -> bool:
    """Whether ``config`` limits OpenCode to ``enabled_providers`` that it defines completely, so
    the catalog cannot add anything OpenCode would use."""
    enabled = config.get("enabled_providers")
    providers = config.get("provider")
    if not isinstance(enabled, list) or not enabled or not isinstance(providers, dict):
        return False
    for provider_id in enabled:
        entry = providers.get(provider_id) if isinstance(provider_id, str) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("npm"), str) and entry.get("models")):
            return False
    return True


def catalog_environment(choice: str, config: dict[str, Any], folder: Path) -> dict[str, str]:
    """The environment that points OpenCode at the catalog ``choice`` means for ``config``:
    ``{}`` for OpenCode's own, else ``OPENCODE_MODELS_PATH``. An empty catalog is written into
    ``folder`` (readable by everyone: the agent's user may run OpenCode); a path is checked.

    Raises :class:`EngineError` for a path that is no readable JSON object."""
    if choice == "bundled" or (choice == "auto" and not defines_every_enabled_provider(config)):
        return {}
    if choice in ("auto", "none"):
        return {"OPENCODE_MODELS_PATH": str(_write_empty(folder))}
    path = Path(choice).expanduser()
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EngineError(f"models_catalog {str(path)!r} is not a readable JSON file: {exc}") from None
    if not isinstance(loaded, dict):
        raise EngineError(f"models_catalog {str(path)!r} holds no JSON object (models.dev's api.json format)")
    return {"OPENCODE_MODELS_PATH": str(path.resolve())}


def _write_empty(folder: Path) -> Path:
    path = folder / EMPTY_CATALOG_NAME
    folder.mkdir(parents=True, exist_ok=True)
    # A fresh random name opened O_EXCL | O_NOFOLLOW, then renamed over the old one: never written
    # through a link the agent's user (who may own ``folder``) left there.
    temporary = folder / f".{EMPTY_CATALOG_NAME}.{secrets.token_hex(8)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o644)  # whatever the umask (077 in agent_user mode)
        file.write("{}\n")
    os.replace(temporary, path)
    return path
