"""Configuration that points the real agents at the offline model."""

from __future__ import annotations

from typing import Any

PROVIDER_ID = "offline"
MODEL_ID = "scripted"


def _root(base_url: str) -> str:
    """Accept the server URL with or without the ``/v1`` suffix."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def opencode_provider_config(base_url: str) -> dict[str, Any]:
    """The OpenCode config fragment (for ``OPENCODE_CONFIG_CONTENT``) using the offline model.

    Provider ``offline`` through the built-in ``@ai-sdk/openai-compatible`` package (no download),
    model ``offline/scripted`` for both the main and the small (title) model, every other provider
    disabled. Merge in a ``permission`` block for headless runs.
    """
    model = {
        "name": "Scripted offline model",
        "tool_call": True,
        "reasoning": True,
        "attachment": False,
        "temperature": False,
        "limit": {"context": 128000, "output": 4096},
    }
    return {
        "provider": {
            PROVIDER_ID: {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Offline scripted model",
                "options": {"baseURL": f"{_root(base_url)}/v1", "apiKey": "offline"},
                "models": {MODEL_ID: model},
            }
        },
        "model": f"{PROVIDER_ID}/{MODEL_ID}",
        "small_model": f"{PROVIDER_ID}/{MODEL_ID}",
        "enabled_providers": [PROVIDER_ID],
        "autoupdate": False,
        "share": "disabled",
    }


def claude_env(base_url: str, *, max_retries: int = 0) -> dict[str, str]:
    """Environment variables that make Claude Code use the offline model and nothing else.

    Add a private ``HOME`` and ``CLAUDE_CONFIG_DIR`` yourself. Retries default to 0: the script is
    deterministic, so a retried ``fail`` fails again and retrying only adds back-off delay.
    """
    return {
        "ANTHROPIC_BASE_URL": _root(base_url),
        "ANTHROPIC_API_KEY": "offline",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": str(max_retries),
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
    }
