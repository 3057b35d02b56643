"""Station's own tools for the coding agent (``station_kv_get``, ``station_kv_set``, ``station_session_info``), served by the sidecar over MCP."""
