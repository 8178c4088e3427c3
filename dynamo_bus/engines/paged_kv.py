"""The KV-block half of an engine whose KV cache is paged in a :class:`BlockPool`.

Owns :class:`PagedKVEngine`: the pool (created by the subclass when it starts), the step
lock that keeps KV reads and writes out of a running step, the residency reports the
worker publishes for KV-aware routers, whole-block KV export/import (the interface
disaggregation uses), and the tiers of the KV block manager below the pool
(:mod:`dynamo_bus.kvbm`): blocks the pool evicts are copied to the host tier (G2)
before a step overwrites them, blocks the host tier evicts are written to the disk tier
(G3) if they were asked for often enough, and a prefix found in either is copied back
(onboarded) instead of recomputed. A subclass says how its blocks are laid out, read and
written; the batching scheduler (:mod:`dynamo_bus.engines.scheduler`) is the one
subclass here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from dynamo_bus.engines.base import Engine, KVBlocks, KVLayout
from dynamo_bus.engines.block_pool import BlockPool
from dynamo_bus.engines.kv_peers import KVPeers
from dynamo_bus.kvbm.disk import DiskTier
from dynamo_bus.kvbm.files import BlockFiles, fingerprint_digest
from dynamo_bus.kvbm.host import HostTier
from dynamo_bus.kvbm.policy import make_policy

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("evict", "write-through")  # when a block is copied to the host tier


class PagedKVEngine(KVPeers, Engine):
    """An engine whose KV blocks are the pool's blocks; see the module docstring."""

    def __init__(self, *, host_blocks: int = 0, kv_policy: str = "lru",
                 kv_offload: str = "evict", disk_blocks: int = 0, disk_dir: str = "",
                 disk_admit_after: int = 2) -> None:
        make_policy(kv_policy)  # an unknown name fails here, not at start
        if kv_offload not in OFFLOAD_MODES:
            raise ValueError(f"unknown offload mode {kv_offload!r}; choose from "
                             f"{', '.join(OFFLOAD_MODES)}")
        self.kv_offload = kv_offload
        self._pool: BlockPool | None = None
        self._step_lock = asyncio.Lock()    # held while a step runs
        self.host_blocks = host_blocks      # G2 size; 0: no host tier
        self.kv_policy = kv_policy
        self.host: HostTier | None = None
        self._planned: set[str] = set()  # the requests of the step planned last; of
        self._free_after_step: list[str] = []  # those finished since, the blocks go later
        self.disk_blocks = disk_blocks      # G3 size; 0: no disk tier
        self.disk_dir = disk_dir            # where G3 keeps its files ("": no files)
        self.disk_admit_after = disk_admit_after
        self.disk: DiskTier | None = None
        self._transfers: Any = None  # the NIXL agent other workers read G2 through
        self._peers: set[str] = set()  # agents it has read from (their metadata added)
        # Blocks lent to and read from other workers over NIXL (the load report's "nixl").
        self._nixl_moves: dict[str, float] = dict.fromkeys(
            ("lent_blocks", "read_blocks", "read_bytes", "read_seconds"), 0)
        self._kv_digest = b""  # what a block's bytes mean (see kv_digest)
        if disk_blocks > 0 and host_blocks <= 0:
            raise ValueError("a disk tier needs a host tier above it (--kvbm-host-gib)")

    def _free_blocks(self, request_id: str) -> None:
        """Give a finished request's blocks back: now, or, if a step was planned with
        them, once it ran (it still writes them, and a block it completes is found by
        its hash only once its KV is in)."""
        if request_id in self._planned:
            self._free_after_step.append(request_id)
        else:
            self.pool.free(request_id)

    def _step_ran(self) -> None:
        self._planned = set()
        for request_id in self._free_after_step:
            self.pool.free(request_id)
        self._free_after_step.clear()

    def _kv_layout(self) -> KVLayout:
        raise NotImplementedError(f"the {self.name} engine does not move KV blocks")

    def _read_blocks(self, block_ids: list[int]) -> Any:
        """The KV of these blocks, in :class:`KVLayout` order (a copy)."""
        raise NotImplementedError(f"the {self.name} engine does not move KV blocks")

    def _write_blocks(self, block_ids: list[int], data: Any) -> None:
        """Store ``data`` (``[len(block_ids), ...]`` in layout order) into these blocks."""
        raise NotImplementedError(f"the {self.name} engine does not move KV blocks")

    def _host_block_shape(self) -> tuple[tuple[int, ...], Any] | None:
        """(one block's shape in the export layout, its dtype) for a host tier that
        holds KV data; None for one that keeps bookkeeping only (no KV data here)."""
        return None

    async def _start_tiers(self, pool: BlockPool) -> None:
        """Called once the pool exists: build the tiers configured below it."""
        self._pool = pool
        if self.host_blocks > 0:
            shape = self._host_block_shape()
            block_shape, dtype = shape if shape is not None else (None, None)
            self.host = HostTier(self.host_blocks, policy=make_policy(self.kv_policy),
                                 block_shape=block_shape, dtype=dtype, pin=self._pin_host())
            if self.host.data is not None:
                rows = self.host.data  # what a block's bytes mean: readers must agree
                self._kv_digest = fingerprint_digest(self.fingerprint, rows.shape[1:],
                                                     rows.dtype)
            pool.record_evictions()
            if self.kv_offload == "write-through":
                pool.record_indexed()
        if self.disk_blocks > 0:
            files = None
            if self.host is not None and self.host.data is not None and self.disk_dir:
                rows = self.host.data
                files = BlockFiles(self.disk_dir, self.disk_blocks,
                                   block_shape=tuple(rows.shape[1:]), dtype=rows.dtype,
                                   fingerprint=self._kv_digest)
            self.disk = DiskTier(self.disk_blocks, policy=make_policy(self.kv_policy),
                                 files=files, admit_after=self.disk_admit_after)
            await self.disk.start()

    async def _stop_tiers(self, onboards: set[asyncio.Future[None]]) -> None:
        """Wait for the copies in under way (they end before the KV they write into
        goes), finish what the tiers are writing, let go of their files."""
        if onboards:
            await asyncio.wait(list(onboards))
        if self.disk is not None:
            await self.disk.close()
        if self.host is not None:
            self.host.deregister()
        self._close_transfers()

    def _pin_host(self) -> bool:
        return False

    async def _offload(self) -> None:
        """Copy the blocks the pool just evicted to the host tier. Runs between
        ``_schedule`` (which evicts) and the step that overwrites them."""
        evicted = self.pool.take_evicted()
        if evicted and self.host is not None:
            await self._copy_out(evicted)

    async def _write_through(self) -> None:
        """``--kvbm-offload write-through``: copy every block a step completed to the
        host tier now, so evicting it later costs no copy. Runs after the step."""
        if self.host is not None and self.kv_offload == "write-through":
            await self._copy_out(self.pool.take_indexed())

    async def _copy_out(self, blocks: list[tuple[int, int]]) -> None:
        """Save the pool's (hash, block id) ``blocks`` below it: into the host tier, and
        what the host tier gives up for them (or has no room for) down to the disk tier,
        if worth a write. The bookkeeping now, on the event loop; the copies in a thread
        (the caller waits for them: nothing reads the new host blocks or reuses the pool
        blocks until the scheduler's next planning); disk writes after, in the disk
        tier's own thread."""
        host, disk = self.host, self.disk
        assert host is not None
        src, slots, evicted = host.reserve([h for h, _ in blocks])
        new = [blocks[i][0] for i in src]
        plan = over = []
        if disk is not None:
            plan = disk.demote(evicted)  # host slot -> disk
            taken = set(src)
            rest = [i for i, (h, _) in enumerate(blocks) if i not in taken and h not in host]
            # More than the host tier holds at once: straight from the pool to disk.
            over = disk.demote([(blocks[i][0], j) for j, i in enumerate(rest)])
        if host.data is None or not (slots or over):
            host.written(new)
            if disk is not None:
                disk.write_later(plan + over)
            return
        block_ids = [blocks[i][1] for i in src]
        over_ids = [blocks[rest[j]][1] for _, j, _, _ in over]

        def copy() -> None:
            if disk is not None and plan:
                disk.stage(plan, host.data)  # before the new blocks take their slots
            rows = self._read_blocks(block_ids + over_ids)
            if slots:
                host.write(slots, rows[:len(slots)])
            if disk is not None and over:
                disk.stage([(h, len(slots) + i, d, r) for i, (h, _, d, r) in enumerate(over)],
                           rows)

        ok = False
        try:
            await asyncio.to_thread(copy)
            ok = True
        except Exception:
            log.exception("copying %d blocks to the host tier failed; they are dropped",
                          len(slots))
        finally:
            host.written(new, ok=ok)
            if disk is not None:
                disk.write_later(plan + over, staged=ok)

    async def _onboard_blocks(self, block_ids: list[int], slots: list[int]) -> None:
        """Copy the host tier's ``slots`` (pinned there meanwhile) into the pool's
        ``block_ids``, off the event loop: other requests' steps go on meanwhile (the
        blocks belong to a request the scheduler does not run until this returns)."""
        host = self.host
        assert host is not None
        if host.data is None:
            return
        data = host.data

        def copy() -> None:
            import torch

            self._write_blocks(block_ids, data.index_select(0, torch.tensor(slots)))

        await asyncio.to_thread(copy)

    async def _onboard(self, block_ids: list[int], host_slots: list[int],
                       from_disk: list[int]) -> int:
        """Copy a prefix into the pool's ``block_ids``: the host tier's ``host_slots``
        first, then the disk tier's blocks ``from_disk``. Returns how many of
        ``block_ids``, from the first, hold their KV now (the rest is computed)."""
        done = 0
        try:
            if host_slots:
                assert self.host is not None
                started = time.perf_counter()
                await self._onboard_blocks(block_ids[:len(host_slots)], host_slots)
                self.host.onboard_seconds += time.perf_counter() - started
                done = len(host_slots)
            if from_disk:
                assert self.disk is not None
                started = time.perf_counter()
                done += await self._onboard_disk(block_ids[done:], from_disk)
                self.disk.onboard_seconds += time.perf_counter() - started
        except Exception:
            log.exception("%s: copying %d blocks in from the KV block manager failed; "
                          "computing them instead", self.name, len(block_ids) - done)
        return done

    async def _onboard_disk(self, block_ids: list[int], hashes: list[int]) -> int:
        """Read the disk tier's blocks ``hashes`` into the pool's ``block_ids``, in the
        tier's I/O thread. Returns how many, from the first, are in: a block that fails
        its checks stops the read there (the rest is computed)."""
        disk = self.disk
        assert disk is not None

        def sink(first: int, rows: Any) -> None:
            self._write_blocks(block_ids[first:first + len(rows)], rows)

        return await disk.read(hashes, sink)

    def residency_changes(self) -> dict[int, str | None]:
        """Each block whose fastest tier changed, with that tier (None: gone)."""
        pool = self._pool
        if pool is None:
            return {}
        host, disk = self.host, self.disk
        if host is None:
            return {h: "device" if held else None for h, held in pool.drain_changes().items()}
        changed = pool.drain_changes()
        changed.update(host.drain_changes())
        if disk is None:
            return {h: "device" if pool.holds(h) else "host" if h in host else None
                    for h in changed}
        changed.update(disk.drain_changes())
        return {h: "device" if pool.holds(h) else "host" if h in host
                else "disk" if h in disk else None for h in changed}

    def _tier_usage(self) -> tuple[dict[str, int], dict[str, int]]:
        """Blocks held and room, per tier, for the load report and ``/health``."""
        held, room = {}, {}
        pool = self._pool
        if pool is not None:
            held["device"], room["device"] = pool.num_active + pool.num_cached, pool.num_blocks
        if self.host is not None:
            held["host"], room["host"] = len(self.host), self.host.capacity
        if self.disk is not None and self.disk.disabled is None:
            held["disk"], room["disk"] = len(self.disk), self.disk.capacity
        return held, room

    def _tier_moves(self) -> dict[str, dict[str, float]]:
        """What moved through each tier below the pool since start, for the load report
        and ``/health``: blocks stored, evicted, read back (onboarded or lent), the bytes
        read and the time spent onboarding; the disk tier's skipped and corrupt blocks."""
        moves: dict[str, dict[str, float]] = {}
        # A block's bytes: the host tier's rows, or what a data-less (mock) engine models.
        block_bytes = (self.host.block_bytes if self.host is not None else 0) or int(
            getattr(self, "kv_bytes_per_token", 0)) * self.pool.block_size
        for tier in (self.host, self.disk):
            if tier is None:
                continue
            moves[tier.name] = {
                "stored_blocks": tier.stored, "evicted_blocks": tier.evicted,
                "onboarded_blocks": tier.onboarded,
                "onboarded_bytes": tier.onboarded * block_bytes,
                "onboard_seconds": round(tier.onboard_seconds, 6)}
        if self.disk is not None:
            moves["disk"].update(skipped_blocks=self.disk.skipped,
                                 corrupt_blocks=self.disk.corrupt)
        if self._transfers is not None:
            moves["nixl"] = {k: round(v, 6) for k, v in self._nixl_moves.items()}
        return moves

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
            await self._offload()  # what that evicted, before it is overwritten
            if taken:
                self._write_blocks([b for _, b in taken], blocks.data[[i for i, _ in taken]])
        return len(taken)
