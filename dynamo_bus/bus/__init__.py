"""The bus: everything the roles share through NATS.

``connection`` (connect, the streams, consumers and buckets every role needs, :class:`Bus`),
``natsserver`` (the embedded nats-server), ``subjects`` (:class:`Names`: every subject,
stream, consumer and bucket name), ``messages`` (every wire message, versioned msgspec
Structs), ``consumer`` (the bounded pull consumer), ``registry`` (live workers and their
load, from the KV buckets), ``handback`` (returning unstarted requests to the routers) and
``recent`` (a bounded set of recently seen ids, for redelivery).
"""

from dynamo_bus.bus.connection import WORK_ACK_WAIT, Bus, connect, open_bus
from dynamo_bus.bus.consumer import PullConsumer
from dynamo_bus.bus.natsserver import EmbeddedNats
from dynamo_bus.bus.registry import Registry
from dynamo_bus.bus.subjects import Names, validate_worker_id

__all__ = ["WORK_ACK_WAIT", "Bus", "EmbeddedNats", "Names", "PullConsumer", "Registry",
           "connect", "open_bus", "validate_worker_id"]
