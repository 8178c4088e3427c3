"""What every tier of the KV block manager keeps: which blocks it holds, in which slot.

A tier below the engine's device pool holds whole KV blocks in numbered slots (rows of a
host buffer, places in block files), found by their chained sequence hash as in the
pool. :class:`BlockTier` is that bookkeeping, shared by the host tier (G2,
:mod:`dynamo_bus.kvbm.host`) and the disk tier (G3, :mod:`dynamo_bus.kvbm.disk`):

* ``reserve`` takes slots for new blocks, evicting as the eviction policy says; a
  reserved block counts as held at once but ``prefix`` does not find it until
  ``written`` says its data is in, so nobody reads half a block;
* ``pin`` keeps blocks being read out of the tier from eviction until ``unpin``;
* the tier records which hashes it gained or lost since the last ``drain_changes()``:
  with the other tiers' changes, that is each block's fastest tier, which the worker
  publishes as residency (a block that moves down a tier is not gone).

A tier without data (the simulated engine's) is this bookkeeping alone. Not
thread-safe: the engine's scheduler owns it, on the event loop; only block data is
copied in other threads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dynamo_bus.kvbm.policy import LRU, EvictionPolicy


class BlockTier:
    """See the module docstring."""

    name = "tier"

    def __init__(self, capacity: int, *, policy: EvictionPolicy | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"a {self.name} tier needs room for at least one block")
        self.capacity = capacity
        self.policy = policy if policy is not None else LRU()
        self._slot: dict[int, int] = {}
        self._free = list(range(capacity - 1, -1, -1))  # lowest slot handed out first
        self._changes: dict[int, bool] | None = None
        self._pinned: dict[int, int] = {}  # hash -> reads under way
        self._writing: set[int] = set()    # reserved, their data not written yet
        self.stored = 0    # blocks written in, ever
        self.evicted = 0   # blocks dropped to make room, ever
        self.onboarded = 0  # blocks read back out (onboarded or lent), ever
        self.onboard_seconds = 0.0  # time the engine spent bringing blocks in from here

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._slot

    def slot(self, block_hash: int) -> int:
        return self._slot[block_hash]

    def prefix(self, hashes: Sequence[int]) -> int:
        """How many of the leading ``hashes`` this tier holds, written."""
        n = 0
        for h in hashes:
            if h not in self._slot or h in self._writing:
                break
            n += 1
        return n

    def reserve(self, hashes: Sequence[int]) -> tuple[list[int], list[int],
                                                      list[tuple[int, int]]]:
        """Make room for the blocks ``hashes`` this tier does not hold, evicting as the
        policy says, never a block named in ``hashes``, a pinned one or one being
        written; blocks already held are only touched. Stops early when nothing can be
        evicted. Returns (the new blocks' indices in ``hashes``, their slots, the
        (hash, slot) of each block evicted, whose slot a new block now has)."""
        keep = set(hashes)
        keep.update(self._pinned)
        keep.update(self._writing)
        evicted: list[tuple[int, int]] = []
        src: list[int] = []
        slots: list[int] = []
        for i, h in enumerate(hashes):
            if h in self._slot:
                self.policy.touch(h)
                continue
            if not self._free:
                victim = self.policy.victim(keep)
                if victim is None:
                    break
                evicted.append((victim, self._slot[victim]))
                self._drop(victim)
            slot = self._free.pop()
            self._slot[h] = slot
            self._writing.add(h)
            self.policy.insert(h)
            self._note(h, True)
            src.append(i)
            slots.append(slot)
        self.evicted += len(evicted)
        return src, slots, evicted

    def written(self, hashes: Iterable[int], *, ok: bool = True) -> None:
        """The data of reserved blocks is in (``ok``), or never will be: they go."""
        for h in hashes:
            if h in self._writing:
                self._writing.discard(h)
                if ok:
                    self.stored += 1
                else:
                    self._drop(h)

    def restore(self, blocks: Iterable[tuple[int, int]]) -> None:
        """Hold these (slot, hash) blocks, already written: a tier that keeps its data
        across restarts finds it again. Oldest first, as the policy orders them; for an
        empty tier."""
        if self._slot:
            raise RuntimeError("restore is for an empty tier")
        for slot, block_hash in blocks:
            if block_hash in self._slot or not 0 <= slot < self.capacity:
                raise ValueError(f"block {block_hash:#x} or slot {slot} given twice")
            self._slot[block_hash] = slot
            self.policy.insert(block_hash)
            self._note(block_hash, True)
        taken = set(self._slot.values())
        if len(taken) != len(self._slot):
            raise ValueError("two blocks restored to one slot")
        self._free = [s for s in range(self.capacity - 1, -1, -1) if s not in taken]

    def pin(self, hashes: Sequence[int]) -> list[int]:
        """The slots of the blocks ``hashes`` (all held), kept from eviction until
        ``unpin``: for a read out of the tier that runs while the tier takes new blocks."""
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

    def discard(self, hashes: Iterable[int]) -> None:
        """Forget blocks whose data turned out bad (or a tier that gave up)."""
        for h in hashes:
            if h in self._slot:
                self._writing.discard(h)
                self._drop(h)

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
