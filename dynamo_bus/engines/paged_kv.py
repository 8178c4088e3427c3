"""The KV-block half of an engine whose KV cache is paged in a :class:`BlockPool`.

Owns :class:`PagedKVEngine`: the pool (created by the subclass when it starts), the step
lock that keeps KV reads and writes out of a running step, the residency reports the
worker publishes for KV-aware routers, and whole-block KV export/import (the interface
disaggregation uses). A subclass says how its blocks are laid out, read and written; the
batching scheduler (:mod:`dynamo_bus.engines.scheduler`) is the one subclass here.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dynamo_bus.engines.base import Engine, KVBlocks, KVLayout
from dynamo_bus.engines.block_pool import BlockPool


class PagedKVEngine(Engine):
    """An engine whose KV blocks are the pool's blocks; see the module docstring."""

    def __init__(self) -> None:
        self._pool: BlockPool | None = None
        self._step_lock = asyncio.Lock()    # held while a step runs

    def _kv_layout(self) -> KVLayout:
        raise NotImplementedError(f"the {self.name} engine does not move KV blocks")

    def _read_blocks(self, block_ids: list[int]) -> Any:
        """The KV of these blocks, in :class:`KVLayout` order (a copy)."""
        raise NotImplementedError(f"the {self.name} engine does not move KV blocks")

    def _write_blocks(self, block_ids: list[int], data: Any) -> None:
        """Store ``data`` (``[len(block_ids), ...]`` in layout order) into these blocks."""
        raise NotImplementedError(f"the {self.name} engine does not move KV blocks")

    def residency_changes(self) -> dict[int, str | None]:
        if self._pool is None:
            return {}
        return {h: "device" if held else None for h, held in self._pool.drain_changes().items()}

    @property
    def pool(self) -> BlockPool:
        if self._pool is None:
            raise RuntimeError("the engine is not started")
        return self._pool

    async def export_blocks(self, hashes: list[int]) -> KVBlocks:
        layout = self._kv_layout()
        async with self._step_lock:  # no step writes while the blocks are read
            block_ids = self.pool.lookup(hashes)
            data = self._read_blocks(block_ids)
        return KVBlocks(layout, list(hashes[:len(block_ids)]), data)

    async def import_blocks(self, blocks: KVBlocks) -> int:
        layout = self._kv_layout()
        if blocks.layout != layout:
            raise ValueError(f"KV layout {blocks.layout} does not match this engine's {layout}")
        async with self._step_lock:  # a block freed mid-step may still be written by it
            taken = self.pool.insert_cached(blocks.hashes)
            if taken:
                self._write_blocks([b for _, b in taken], blocks.data[[i for i, _ in taken]])
        return len(taken)
