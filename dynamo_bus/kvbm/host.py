"""G2: whole KV blocks in host memory, under an engine's device pool (G1).

A block evicted from G1 is copied here instead of being lost; a request whose prefix
G1 no longer holds but G2 does gets those blocks copied back (onboarded) instead of
recomputed. The blocks live in one buffer allocated once (page-locked when the engine
runs on CUDA, as DMA and NIXL need it): ``[capacity, *block_shape]`` of the engine's KV
dtype, one block per slot in the engine's export layout
(:class:`~dynamo_bus.engines.base.KVLayout`). Which block is in which slot is the
bookkeeping of :class:`~dynamo_bus.kvbm.tier.BlockTier`. Registered with a NIXL agent
(UCX), the buffer is what another worker reads blocks out of.

A tier without ``block_shape`` keeps the bookkeeping only: the simulated engine has no
KV data, and charges transfer time from a bandwidth model instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dynamo_bus.kvbm.policy import EvictionPolicy
from dynamo_bus.kvbm.tier import BlockTier


class HostTier(BlockTier):
    """See the module docstring."""

    name = "host"

    def __init__(self, capacity: int, *, policy: EvictionPolicy | None = None,
                 block_shape: tuple[int, ...] | None = None, dtype: Any = None,
                 pin: bool = False) -> None:
        super().__init__(capacity, policy=policy)
        self.data: Any = None
        self._nixl: tuple[Any, Any] | None = None  # (agent, registration)
        if block_shape is not None:
            import torch

            self.data = torch.empty((capacity, *block_shape), dtype=dtype, pin_memory=pin)

    def register(self, agent: Any) -> None:
        """Register the buffer with a NIXL agent (host memory, once): another agent
        then reads blocks straight out of it, by the ``descriptors`` of their slots."""
        if self.data is None:
            raise ValueError("a host tier without KV data has nothing to register")
        self._nixl = (agent, agent.register_memory(
            [(self.data.data_ptr(), self.data.numel() * self.data.element_size(), 0, "")],
            "DRAM"))

    def deregister(self) -> None:
        if self._nixl is not None:
            agent, reg = self._nixl
            agent.deregister_memory(reg)
            self._nixl = None

    def descriptors(self, slots: Sequence[int]) -> list[tuple[int, int, int]]:
        """(address, bytes, device 0) of each slot's block, for NIXL transfer lists."""
        base, size = self.data.data_ptr(), self.block_bytes
        return [(base + s * size, size, 0) for s in slots]

    @property
    def block_bytes(self) -> int:
        if self.data is None:
            return 0
        return int(self.data[0].numel() * self.data.element_size())

    def put(self, hashes: Sequence[int], data: Any = None) -> list[int]:
        """Store the blocks ``hashes`` (``data[i]`` is block ``i``; None for a tier
        without data): ``reserve``, ``write``, ``written``. Returns the hashes evicted."""
        src, slots, evicted = self.reserve(hashes)
        if self.data is not None and slots:
            import torch

            self.write(slots, data if len(src) == len(data) else data[torch.tensor(src)])
        self.written([hashes[i] for i in src])
        return [h for h, _ in evicted]

    def write(self, slots: list[int], rows: Any) -> None:
        """Copy ``rows`` (one block each) into ``slots``. Touches only the data, so it
        may run in another thread while the owner goes on with the bookkeeping."""
        import torch

        self.data.index_copy_(0, torch.tensor(slots), rows.to(self.data.device, self.data.dtype))
