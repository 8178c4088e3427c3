"""Which block a tier gives up when it needs room.

A tier tells its policy what happens to the blocks it holds, by block hash: ``insert``
when one arrives, ``touch`` when one is read (a hit), ``remove`` when one leaves for any
reason; ``victim`` names the block to evict next (the tier then removes it). A policy
never holds block data and never evicts on its own, so one that scores blocks by
something else (the request stream, a semantic score) only has to answer ``victim``.

* :class:`LRU` (the default): the block read or stored longest ago goes first.
* :class:`LFU`: the block read least often goes first, the oldest among equals; every
  count halves once the tier has seen ``aging`` operations per block it holds, so a
  block that was popular once does not stay forever.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Container
from typing import Protocol

POLICIES = ("lru", "lfu")


class EvictionPolicy(Protocol):
    def insert(self, block_hash: int) -> None: ...

    def touch(self, block_hash: int) -> None: ...

    def remove(self, block_hash: int) -> None: ...

    def victim(self, keep: Container[int] = ()) -> int | None:
        """The block to evict next, skipping those in ``keep``; None if every block is
        kept (or none is held)."""
        ...

    def __len__(self) -> int: ...

    def __contains__(self, block_hash: object) -> bool: ...


class LRU:
    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()  # least recent first

    def insert(self, block_hash: int) -> None:
        self._order[block_hash] = None
        self._order.move_to_end(block_hash)

    def touch(self, block_hash: int) -> None:
        if block_hash in self._order:
            self._order.move_to_end(block_hash)

    def remove(self, block_hash: int) -> None:
        self._order.pop(block_hash, None)

    def victim(self, keep: Container[int] = ()) -> int | None:
        for h in self._order:
            if h not in keep:
                return h
        return None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._order


class LFU:
    """Least frequently used, with aging; see the module docstring. ``victim`` is
    amortised O(log n): a heap of (count, last use, hash) entries, stale ones skipped."""

    def __init__(self, *, aging: int = 8) -> None:
        if aging < 1:
            raise ValueError("aging must be at least 1")
        self.aging = aging
        self._count: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._heap: list[tuple[int, int, int]] = []
        self._tick = 0
        self._since_aging = 0

    def _stamp(self, block_hash: int) -> None:
        self._tick += 1
        self._last[block_hash] = self._tick
        heapq.heappush(self._heap, (self._count[block_hash], self._tick, block_hash))
        self._since_aging += 1
        if self._since_aging >= self.aging * max(len(self._count), 1):
            self._age()

    def _age(self) -> None:
        self._since_aging = 0
        for h in self._count:
            self._count[h] = (self._count[h] + 1) // 2
        self._heap = [(c, self._last[h], h) for h, c in self._count.items()]
        heapq.heapify(self._heap)

    def insert(self, block_hash: int) -> None:
        self._count[block_hash] = self._count.get(block_hash, 0) + 1
        self._stamp(block_hash)

    def touch(self, block_hash: int) -> None:
        if block_hash in self._count:
            self._count[block_hash] += 1
            self._stamp(block_hash)

    def remove(self, block_hash: int) -> None:
        if self._count.pop(block_hash, None) is not None:
            del self._last[block_hash]
        if len(self._heap) > 4 * len(self._count) + 64:  # mostly stale: rebuild
            self._heap = [(c, self._last[h], h) for h, c in self._count.items()]
            heapq.heapify(self._heap)

    def _current(self, entry: tuple[int, int, int]) -> bool:
        count, tick, h = entry
        return self._count.get(h) == count and self._last.get(h) == tick

    def victim(self, keep: Container[int] = ()) -> int | None:
        heap = self._heap
        while heap and not self._current(heap[0]):
            heapq.heappop(heap)
        if not heap:
            return None
        if heap[0][2] not in keep:
            return heap[0][2]
        # Rare (a prefix being brought in is kept): look past the kept ones in order.
        for entry in sorted(e for e in heap if self._current(e)):
            if entry[2] not in keep:
                return entry[2]
        return None

    def __len__(self) -> int:
        return len(self._count)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._count


def make_policy(name: str) -> EvictionPolicy:
    if name == "lru":
        return LRU()
    if name == "lfu":
        return LFU()
    raise ValueError(f"unknown eviction policy {name!r}; choose from {', '.join(POLICIES)}")
