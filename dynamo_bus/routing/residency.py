"""Which worker holds which KV blocks: what a worker publishes.

Residency travels as event batches plus snapshots, all in JetStream, and no router
keeps anything of its own:

* every ``interval`` a worker's :class:`ResidencyPublisher` takes what changed in its
  engine's cache and publishes it as one :class:`~dynamo_bus.bus.messages.ResidencyBatch`
  on its residency subject (stored, tier-changed and removed block hashes, packed):
  one stored message per interval, not one per block. Batches of one incarnation are
  numbered 1, 2, ... with no holes: a batch is published, acknowledged and only then
  is the next one built, and a batch the server may not have stored is sent again
  unchanged under the same de-duplication id, so it is stored once and in order (a
  lost acknowledgement can never bring back a block a later batch removed).
* now and then (``snapshot_every`` seconds, or after as many changes as it holds, or
  when a router asks on the worker's sync subject) it writes a
  :class:`~dynamo_bus.bus.messages.ResidencySnapshot` of everything it holds into the
  snapshot object store, then purges the batches its previous snapshot covers, so the
  stream stays about two snapshot intervals long and a router that loaded the previous
  snapshot a moment ago still finds every batch after it.
* routers read the snapshots, then the batches after them
  (:mod:`dynamo_bus.routing.residency_watch`).

A worker starts by removing what an earlier incarnation under its id left and writing
an empty snapshot; it removes its snapshot and batches when it leaves. A worker that was
away longer than its TTL (routers may have dropped it) writes a fresh snapshot and a
batch after it, which routers take as a gap and heal from the snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from nats.aio.msg import Msg

from dynamo_bus.bus.connection import Bus
from dynamo_bus.bus.messages import (
    RESIDENCY_BATCH,
    RESIDENCY_SNAPSHOT,
    ResidencyBatch,
    ResidencySnapshot,
    pack_hashes,
    unpack_hashes,
)
from dynamo_bus.routing.kv_index import TIER_RANK

log = logging.getLogger(__name__)

MAX_BATCH = 30_000  # hashes (stored and removed together) per batch: ~360 KB of JSON,
                    # well under NATS' default 1 MB payload limit


class ResidencySource(Protocol):
    """What a publisher reads: an engine (``Engine.residency_changes``). The publisher
    keeps what it told routers itself, so its snapshots match its batches exactly."""

    def residency_changes(self) -> dict[int, str | None]: ...


async def drop_worker_residency(bus: Bus, worker_id: str) -> None:
    """Remove a worker's snapshot and batches (it left, or a router saw it vanish)."""
    names = bus.names
    with contextlib.suppress(Exception):
        await bus.js.purge_stream(names.residency_stream,
                                  subject=names.residency_subject(worker_id))
    if bus.residency is not None:
        with contextlib.suppress(Exception):
            await bus.residency.delete(worker_id)


class ResidencyPublisher:
    """A worker's side: see the module docstring."""

    def __init__(self, bus: Bus, engine: ResidencySource, worker_id: str, *, instance: int,
                 interval: float = 0.02, snapshot_every: float = 30.0,
                 max_batch: int = MAX_BATCH, publish_timeout: float = 2.0) -> None:
        if bus.residency is None:
            raise RuntimeError("the bus was opened without the residency store")
        self.bus = bus
        self.engine = engine
        self.worker_id = worker_id
        self.instance = instance
        self.interval = interval
        self.snapshot_every = snapshot_every
        self.max_batch = max_batch
        self.publish_timeout = publish_timeout
        self.held: dict[int, int] = {}  # what routers were told: hash -> tier index
        self.seq = 0         # the last batch the stream stored
        self.stream_seq = 0  # its position in the stream
        # counters (figures and /health)
        self.batches = 0
        self.blocks = 0
        self.bytes = 0
        self.snapshots = 0
        self.snapshot_bytes = 0
        self._subject = bus.names.residency_subject(worker_id)
        self._pending: dict[int, str | None] = {}  # taken from the engine, not batched yet
        self._outbox: list[ResidencyBatch] = []     # built, not yet stored (in order)
        self._snapshot_seq = -1
        self._snapshot_at = 0.0
        self._changes_since_snapshot = 0
        self._sync_waiters: list[Msg] = []
        self._force_snapshot = False
        self._wake = asyncio.Event()
        self._sending = asyncio.Lock()
        self._purge_below = 0  # the previous snapshot's stream position
        self._sync_sub: object = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await drop_worker_residency(self.bus, self.worker_id)  # an earlier incarnation's
        await self.write_snapshot()
        self._sync_sub = await self.bus.nc.subscribe(
            self.bus.names.residency_sync_subject(self.worker_id), cb=self._on_sync)
        self._task = asyncio.create_task(self._run(), name=f"residency-{self.worker_id}")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)
        if self._sync_sub is not None:
            with contextlib.suppress(Exception):
                await self._sync_sub.unsubscribe()  # type: ignore[attr-defined]
        await drop_worker_residency(self.bus, self.worker_id)

    async def resync(self) -> None:
        """After the worker was away longer than its TTL (routers may have dropped
        its blocks, snapshot and batches): write a fresh snapshot and a batch after
        it, which routers take as a gap and heal from the snapshot."""
        self._force_snapshot = True
        self._wake.set()
        log.info("worker %s: publishing its %d cached blocks again", self.worker_id,
                 len(self.held))

    async def _on_sync(self, msg: Msg) -> None:
        self._sync_waiters.append(msg)
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.publish_changes()
                if self._snapshot_due():
                    await self.write_snapshot()
            except Exception as exc:  # the connection or the stream is away; it comes back
                log.warning("residency publish failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()

    # -- batches --------------------------------------------------------------------------

    def _take_changes(self) -> None:
        """Turn what the engine changed into batches in the outbox (only what differs
        from what routers were told)."""
        pending = self._pending
        pending.update(self.engine.residency_changes())
        if not pending:
            return
        held = self.held
        stored: list[int] = []
        tiers = bytearray()
        removed: list[int] = []
        for h, tier in pending.items():
            if tier is None:
                if h in held:
                    removed.append(h)
            else:
                t = TIER_RANK[tier]
                if held.get(h) != t:
                    stored.append(h)
                    tiers.append(t)
        pending.clear()
        seq, step = self.seq, self.max_batch
        s = r = 0  # how many stored / removed hashes are in batches so far
        while s < len(stored) or r < len(removed):
            n_stored = min(step, len(stored) - s)
            n_removed = min(step - n_stored, len(removed) - r)
            seq += 1
            self._outbox.append(ResidencyBatch(
                worker_id=self.worker_id, instance=self.instance, seq=seq,
                stored=pack_hashes(stored[s:s + n_stored]), tiers=bytes(tiers[s:s + n_stored]),
                removed=pack_hashes(removed[r:r + n_removed])))
            s, r = s + n_stored, r + n_removed

    async def publish_changes(self) -> int:
        """Publish what changed since the last call, batch by batch, each acknowledged
        before the next; returns how many batches were stored. A batch that fails stays
        first in the outbox and goes again, unchanged."""
        async with self._sending:  # one sender at a time, or a batch could be skipped
            if not self._outbox:
                self._take_changes()
            stored = 0
            while self._outbox:
                batch = self._outbox[0]
                await self._publish(batch)
                self._outbox.pop(0)
                stored += 1
            return stored

    async def _publish(self, batch: ResidencyBatch) -> None:
        data = RESIDENCY_BATCH.encode(batch)
        ack = await self.bus.js.publish(
            self._subject, data, timeout=self.publish_timeout,
            headers={"Nats-Msg-Id": f"{self.worker_id}:{self.instance}:{batch.seq}"})
        held = self.held
        stored, removed = unpack_hashes(batch.stored), unpack_hashes(batch.removed)
        held.update(zip(stored, batch.tiers, strict=True))
        for h in removed:
            held.pop(h, None)
        n = len(stored) + len(removed)
        self.seq, self.stream_seq = batch.seq, ack.seq
        self.batches += 1
        self.blocks += n
        self.bytes += len(data)
        self._changes_since_snapshot += n

    async def flush(self, timeout: float = 30.0) -> bool:
        """Publish everything the engine reported so far; False if that failed in time."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await self.publish_changes()
                return True
        return False

    # -- snapshots ------------------------------------------------------------------------

    def _snapshot_due(self) -> bool:
        if self._sync_waiters or self._force_snapshot:
            return True
        if self.seq == self._snapshot_seq:
            return False
        return (self._changes_since_snapshot >= max(4096, len(self.held))
                or time.monotonic() - self._snapshot_at >= self.snapshot_every)

    async def write_snapshot(self) -> None:
        """Write everything held after the last stored batch into the snapshot store,
        answer routers that asked for it, and purge the batches it covers."""
        await self.publish_changes()
        if self.seq == 0:  # nothing published yet: routers start reading after now
            info = await self.bus.js.stream_info(self.bus.names.residency_stream)
            self.stream_seq = info.state.last_seq
        force = self._force_snapshot
        snap = ResidencySnapshot(worker_id=self.worker_id, instance=self.instance,
                                 seq=self.seq, stream_seq=self.stream_seq,
                                 hashes=pack_hashes(self.held.keys()),
                                 tiers=bytes(self.held.values()))
        data = RESIDENCY_SNAPSHOT.encode(snap)
        assert self.bus.residency is not None
        await self.bus.residency.put(self.worker_id, data)
        self._force_snapshot = False  # only once it is written
        self._snapshot_seq, self._snapshot_at = self.seq, time.monotonic()
        self._changes_since_snapshot = 0
        self.snapshots += 1
        self.snapshot_bytes += len(data)
        if force:  # a batch after the snapshot, so routers that dropped us notice
            self._outbox.append(ResidencyBatch(worker_id=self.worker_id,
                                               instance=self.instance, seq=self.seq + 1))
            await self.publish_changes()
        waiters, self._sync_waiters = self._sync_waiters, []
        for msg in waiters:
            with contextlib.suppress(Exception):
                await msg.respond(str(snap.seq).encode())
        # Purge the batches the *previous* snapshot holds: a router that loaded that one
        # a moment ago still finds every batch after it in the stream.
        if self._purge_below:
            with contextlib.suppress(Exception):
                await self.bus.js.purge_stream(self.bus.names.residency_stream,
                                               subject=self._subject, seq=self._purge_below)
        self._purge_below = snap.stream_seq + 1
