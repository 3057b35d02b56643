"""Where state and files live: key-value stores and object stores (NATS or folders), and the
session records Station reads."""
