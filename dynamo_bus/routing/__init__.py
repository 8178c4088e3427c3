"""Routing: which worker serves a request.

``policy`` (the pure decision: Dynamo's tier-aware KV cost, round robin, random, least
loaded, busy thresholds), ``kv_index`` (which worker holds which KV block, per tier),
``residency`` (workers publish their blocks as event batches plus snapshots),
``residency_watch`` (routers read them into the index) and ``router`` (the router role:
pulls the request log, decides, forwards to a worker's work queue).
"""

from dynamo_bus.routing.kv_index import ResidencyIndex
from dynamo_bus.routing.policy import KvWeights, RoutingPolicy
from dynamo_bus.routing.residency import ResidencyPublisher
from dynamo_bus.routing.residency_watch import ResidencyWatcher
from dynamo_bus.routing.router import Router

__all__ = ["KvWeights", "ResidencyIndex", "ResidencyPublisher", "ResidencyWatcher", "Router",
           "RoutingPolicy"]
