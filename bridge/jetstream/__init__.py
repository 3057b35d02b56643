"""JetStream delivery: the embedded nats-server, the stream/consumer/bucket set-up, and the worker
that pulls tasks, runs them through the pipeline and publishes one result each."""
