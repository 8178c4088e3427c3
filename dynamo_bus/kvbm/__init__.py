"""The KV block manager: tiers of whole KV blocks below an engine's device pool (G1),
found by the same chained block hashes: :class:`HostTier` (G2, host memory),
:class:`DiskTier` (G3, block files written and read through NIXL), the bookkeeping they
share (:mod:`dynamo_bus.kvbm.tier`) and the eviction policies every tier uses
(:mod:`dynamo_bus.kvbm.policy`)."""

from dynamo_bus.kvbm.disk import DiskTier
from dynamo_bus.kvbm.host import HostTier
from dynamo_bus.kvbm.policy import LFU, LRU, POLICIES, EvictionPolicy, make_policy
from dynamo_bus.kvbm.tier import BlockTier

__all__ = ["LFU", "LRU", "POLICIES", "BlockTier", "DiskTier", "EvictionPolicy", "HostTier",
           "make_policy"]
