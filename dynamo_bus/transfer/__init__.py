"""KV moving between workers: leases on lent blocks (and, as disaggregated serving
lands, descriptors and the NIXL agents' directory). Workers import it; it imports the
bus and the KV block manager."""

from dynamo_bus.transfer.leases import Lease, LeaseBook

__all__ = ["Lease", "LeaseBook"]
