"""The worker role: ``runtime`` (:class:`Worker`) pulls requests from its work queue into an
engine as it has room, streams tokens back, heartbeats its registration and load, publishes
its KV residency, and drains on shutdown."""

from dynamo_bus.worker.runtime import Worker

__all__ = ["Worker"]
