"""G2: whole KV blocks in host memory, under an engine's device pool (G1).

A block evicted from G1 is copied here instead of being lost; a request whose prefix
G1 no longer holds but G2 does gets those blocks copied back (onboarded) instead of
recomputed. Blocks are found by their chained sequence hash, as in G1, and live in one
buffer allocated once (page-locked when the engine runs on CUDA, as DMA and NIXL need
it): ``[capacity, *block_shape]`` of the engine's KV dtype, one block
per slot in the engine's export layout (:class:`~dynamo_bus.engines.base.KVLayout`).

A tier without ``block_shape`` keeps the bookkeeping only: the simulated engine has no
KV data, and charges transfer time from a bandwidth model instead.

Like the pool, the tier records which hashes it gained or lost since the last
``drain_changes()``: with G1's changes, that is each block's fastest tier for the
residency the worker publishes (a block leaving G1 for G2 changes tier; it is not gone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dynamo_bus.kvbm.policy import LRU, EvictionPolicy


class HostTier:
    """See the module docstring. Not thread-safe: the engine's scheduler owns it."""

    name = "host"

    def __init__(self, capacity: int, *, policy: EvictionPolicy | None = None,
                 block_shape: tuple[int, ...] | None = None, dtype: Any = None,
                 pin: bool = False) -> None:
        if capacity < 1:
            raise ValueError("a host tier needs room for at least one block")
        self.capacity = capacity
        self.policy = policy if policy is not None else LRU()
        self.data: Any = None
        if block_shape is not None:
            import torch

            self.data = torch.empty((capacity, *block_shape), dtype=dtype, pin_memory=pin)
        self._slot: dict[int, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._changes: dict[int, bool] | None = None
        self._pinned: dict[int, int] = {}  # hash -> copies out under way
        self._writing: set[int] = set()    # reserved, their data not written yet
        self.stored = 0    # blocks copied in, ever
        self.evicted = 0   # blocks dropped to make room, ever
        self.onboarded = 0  # blocks read back, ever

    @property
    def block_bytes(self) -> int:
        if self.data is None:
            return 0
        return int(self.data[0].numel() * self.data.element_size())

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._slot

    def prefix(self, hashes: Sequence[int]) -> int:
        """How many of the leading ``hashes`` this tier holds."""
        n = 0
        for h in hashes:
            if h not in self._slot or h in self._writing:
                break
            n += 1
        return n

    def put(self, hashes: Sequence[int], data: Any = None) -> list[int]:
        """Store the blocks ``hashes`` (``data[i]`` is block ``i``; None for a tier
        without data): ``reserve`` then ``write``. Returns the hashes evicted."""
        src, slots, evicted = self.reserve(hashes)
        if self.data is not None and slots:
            import torch

            self.write(slots, data if len(src) == len(data) else data[torch.tensor(src)])
        self.written([hashes[i] for i in src])
        return evicted

    def reserve(self, hashes: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        """Make room for the blocks ``hashes`` this tier does not hold, evicting as the
        policy says, never a block named in ``hashes`` nor a pinned one; blocks already
        held are only touched. Bookkeeping only: the new blocks count as held from now
        on, but ``prefix`` skips them until ``written`` says their data is in. Returns
        (their indices in ``hashes``, their slots, the hashes evicted)."""
        keep = set(hashes)
        keep.update(self._pinned)
        evicted: list[int] = []
        src: list[int] = []
        slots: list[int] = []
        for i, h in enumerate(hashes):
            if h in self._slot:
                self.policy.touch(h)
                continue
            if not self._free:
                victim = self.policy.victim(keep)
                if victim is None:
                    break  # everything held is part of this put
                self._drop(victim)
                evicted.append(victim)
            slot = self._free.pop()
            self._slot[h] = slot
            self._writing.add(h)
            self.policy.insert(h)
            self._note(h, True)
            src.append(i)
            slots.append(slot)
        self.stored += len(slots)
        self.evicted += len(evicted)
        return src, slots, evicted

    def write(self, slots: list[int], rows: Any) -> None:
        """Copy ``rows`` (one block each) into ``slots``. Touches only the data, so it
        may run in another thread while the owner goes on with the bookkeeping."""
        import torch

        self.data.index_copy_(0, torch.tensor(slots), rows.to(self.data.device, self.data.dtype))

    def written(self, hashes: Sequence[int], *, ok: bool = True) -> None:
        """The data of reserved blocks is in (``ok``), or never will be: they go."""
        for h in hashes:
            self._writing.discard(h)
            if not ok and h in self._slot:
                self._drop(h)

    def pin(self, hashes: Sequence[int]) -> list[int]:
        """The slots of the blocks ``hashes`` (all held), kept from eviction until
        ``unpin``: for a copy out of the tier that runs while the tier takes new blocks."""
        for h in hashes:
            self.policy.touch(h)
            self._pinned[h] = self._pinned.get(h, 0) + 1
        self.onboarded += len(hashes)
        return [self._slot[h] for h in hashes]

    def unpin(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            left = self._pinned.pop(h) - 1
            if left:
                self._pinned[h] = left

    def _drop(self, block_hash: int) -> None:
        self._free.append(self._slot.pop(block_hash))
        self.policy.remove(block_hash)
        self._note(block_hash, False)

    def _note(self, block_hash: int, held: bool) -> None:
        if self._changes is not None:
            self._changes[block_hash] = held

    def drain_changes(self) -> dict[int, bool]:
        """Hashes stored (True) or dropped (False) since the last call; the first call
        returns every held hash and starts the log."""
        if self._changes is None:
            self._changes = {}
            return dict.fromkeys(self._slot, True)
        changes, self._changes = self._changes, {}
        return changes
