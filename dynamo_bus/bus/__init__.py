"""The bus: the NATS connection and embedded nats-server, every subject, stream and
bucket name, the wire messages, the pull consumer and the worker registry."""
