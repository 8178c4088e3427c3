"""KV moving between workers: the NIXL agents' directory and leases on lent blocks
(descriptor publishing joins them as the prefill and decode roles land). Workers
import it; it imports the bus."""

from dynamo_bus.transfer.agents import AgentDirectory, agent_name
from dynamo_bus.transfer.leases import Lease, LeaseBook

__all__ = ["AgentDirectory", "Lease", "LeaseBook", "agent_name"]
