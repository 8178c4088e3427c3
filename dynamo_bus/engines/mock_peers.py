"""KV between simulated engines: the mock's half of the prefill and decode roles.

The mock keeps its tiers' bookkeeping but no KV data, so handing blocks from one worker
to another is bookkeeping plus time: a lender parks a prompt's blocks in its host tier
(as the reference engine does) and describes them; a reader adds the blocks it holds in
no tier to its own host tier after ``blocks x block bytes / transfer_bandwidth`` (divided
by the speedup) of its clock, the time a NIXL READ would take, and the request then
onboards them from there as any other. Nothing is pinned: with no bytes to protect, a
lent block the lender evicts meanwhile is still "read". No notifications either: the
lender's leases end by time. Parking, and the checks a reader makes (what the blocks
mean, the block list, the lease), are the reference engine's
(:class:`~dynamo_bus.engines.kv_peers.KVPeers`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dynamo_bus.bus.messages import KVDescriptor
from dynamo_bus.kvbm.files import fingerprint_digest

if TYPE_CHECKING:
    from dynamo_bus.engines.mock import Clock

# KV moved between workers over NIXL (RDMA, 400 Gb/s NDR InfiniBand), bytes/s: what
# the simulated READ of a descriptor's missing blocks takes. Dynamo's replay takes the
# same figure as ``kv_transfer_bandwidth`` (GB/s).
TRANSFER_BANDWIDTH = 50e9


class SimulatedPeers:
    """Mixin before :class:`~dynamo_bus.engines.scheduler.BatchingEngine` in the mock's
    bases: overrides :class:`~dynamo_bus.engines.kv_peers.KVPeers`."""

    if TYPE_CHECKING:  # the engine's (see MockEngine.__init__ and PagedKVEngine)
        host: Any
        disk: Any
        fingerprint: Any
        speedup: float
        clock: Clock
        block_size: int
        kv_bytes_per_token: int
        transfer_bandwidth: float
        _transfers: Any
        _kv_digest: bytes
        _nixl_moves: dict[str, float]

        def holds(self, block_hash: int) -> bool: ...
        def held_prefix(self, hashes: Sequence[int]) -> int: ...
        def _readable(self, descriptor: KVDescriptor) -> Any: ...

    @property
    def transfer_block_bytes(self) -> int:
        return self.kv_bytes_per_token * self.block_size

    async def open_transfers(self, name: str) -> Any:
        if self.host is None:
            raise RuntimeError("the mock engine hands KV between workers through its host "
                               "tier: give it one (--kvbm-host-gib)")
        if self._transfers is None:
            self._transfers = name
            self._kv_digest = fingerprint_digest(self.fingerprint, self.kv_bytes_per_token,
                                                 "mock")
        return name

    def transfer_metadata(self) -> bytes:
        return f"simulated:{self._transfers}".encode()

    async def transfer_notices(self) -> list[bytes]:
        return []

    def lend_host_blocks(self, hashes: list[int]) -> tuple[list[int], list[int]]:
        held = list(hashes[:self.host.prefix(hashes)])
        self._nixl_moves["lent_blocks"] += len(held)
        return held, [0] * len(held)

    def return_host_blocks(self, hashes: list[int]) -> None:
        return None

    async def pull_host_blocks(self, descriptor: KVDescriptor, metadata: bytes) -> int:
        if self.host is None or self._transfers is None:
            raise RuntimeError("open_transfers first")
        hashes = list(self._readable(descriptor))
        await self.receive_blocks(hashes)
        return self.held_prefix(hashes)

    async def receive_blocks(self, hashes: list[int]) -> int:
        """The simulated READ: the blocks of ``hashes`` this engine holds in no tier go
        to its host tier after the time their bytes take at ``transfer_bandwidth``.
        Returns how many it took in."""
        host, disk, size = self.host, self.disk, self.transfer_block_bytes
        missing = [h for h in hashes if not self.holds(h)]
        started = time.perf_counter()
        await self.clock.sleep(len(missing) * size / self.transfer_bandwidth / self.speedup)
        src, _, evicted = host.reserve(missing)
        host.written([missing[i] for i in src])
        if disk is not None:
            disk.write_later(disk.demote(evicted))
        moves = self._nixl_moves
        moves["read_blocks"] += len(src)
        moves["read_bytes"] += len(src) * size
        moves["read_seconds"] += time.perf_counter() - started
        return len(src)
