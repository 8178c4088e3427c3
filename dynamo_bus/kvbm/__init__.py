"""The KV block manager: tiers of whole KV blocks below an engine's device pool (G1),
found by the same chained block hashes. :class:`HostTier` (G2, host memory) and the
eviction policies every tier uses (:mod:`dynamo_bus.kvbm.policy`)."""

from dynamo_bus.kvbm.host import HostTier
from dynamo_bus.kvbm.policy import LFU, LRU, POLICIES, EvictionPolicy, make_policy

__all__ = ["LFU", "LRU", "POLICIES", "EvictionPolicy", "HostTier", "make_policy"]
