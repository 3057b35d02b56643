"""What operators see: traces, metrics, the health/metrics HTTP listener and the fleet heartbeat."""
