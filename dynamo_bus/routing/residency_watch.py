"""Which worker holds which KV blocks: what a router reads.

A router's :class:`ResidencyWatcher` keeps a
:class:`~dynamo_bus.routing.kv_index.ResidencyIndex` equal to what the workers
published (:mod:`dynamo_bus.routing.residency`):

1. it loads every worker's snapshot from the snapshot store;
2. it reads the residency stream from the oldest snapshot's position on, through an
   ephemeral pull consumer (no acks; batches it asks for, so a burst never overruns
   it) and applies each worker's batches in order, skipping those a snapshot already
   holds; once it has read up to where the stream ended when it began, the new index
   replaces the one routers read;
3. a batch that skips one (a router that fell behind the purges, a worker it dropped
   coming back, a stream that lost messages) is a gap: it reloads that worker's
   snapshot, asking the worker for a fresh one when the stored one is older than
   the gap, and applies the batches after it. A worker whose gap cannot be healed has
   its blocks dropped from the index (better unknown than wrong) until it can be.

A router that restarts, or a second replica, reads the same snapshots and stream and
builds the same index. After a reconnect it rebuilds the index the same way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time

from nats.aio.msg import Msg
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from dynamo_bus.bus.connection import Bus
from dynamo_bus.bus.messages import (
    RESIDENCY_BATCH,
    RESIDENCY_SNAPSHOT,
    TIERS,
    ResidencyBatch,
    ResidencySnapshot,
    unpack_hashes,
)
from dynamo_bus.errors import ProtocolError
from dynamo_bus.routing.kv_index import ResidencyIndex
from dynamo_bus.routing.residency import drop_worker_residency

log = logging.getLogger(__name__)

SYNC_TIMEOUT = 2.0  # seconds a worker has to write a snapshot a router asked for
HEAL_BACKOFF = 2.0  # after a gap could not be healed, the next try waits this long


def _position(reply: str) -> tuple[int, int]:
    """A message's stream sequence and how many are still pending after it, from its
    JetStream ack subject (``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.
    <pending>``, or the form with domain and account hash before the stream and a token
    after)."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[8])
    return int(tokens[7]), int(tokens[10])


class _View:
    """An index and, per worker, the incarnation and last batch applied to it."""

    def __init__(self, index: ResidencyIndex) -> None:
        self.index = index
        self.applied: dict[str, tuple[int, int]] = {}
        self.healing: dict[str, list[ResidencyBatch]] = {}  # batches held while healing
        self.quiet_until: dict[str, float] = {}
        self.forgotten: dict[str, int] = {}  # times each worker was forgotten (heals check)


class ResidencyWatcher:
    """A router's side: see the module docstring."""

    BATCH = 1024       # messages per pull
    EXPIRES = 1.0      # seconds a pull waits for news

    def __init__(self, bus: Bus, index: ResidencyIndex | None = None) -> None:
        if bus.residency is None:
            raise RuntimeError("the bus was opened without the residency store")
        self.bus = bus
        self.index = index if index is not None else ResidencyIndex()
        self._live = _View(self.index)
        self._building: _View | None = None
        self._task: asyncio.Task[None] | None = None
        self._heals: set[asyncio.Task[None]] = set()
        self._closed = False
        self._synced = asyncio.Event()
        # counters (figures and /health)
        self.batches = 0
        self.gaps = 0
        self.heals = 0
        self.heal_failures = 0
        self.snapshots_loaded = 0
        bus.on_reconnect.append(self._rewatch)

    async def start(self, wait: float = 10.0) -> None:
        """Start watching; waits up to ``wait`` s for the snapshots and the stream
        to be read (routing goes on with a partial index past that)."""
        self._task = asyncio.create_task(self._watch())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._synced.wait()

    async def stop(self) -> None:
        self._closed = True
        tasks = {t for t in (self._task, *self._heals) if t is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    def forget(self, worker_id: str) -> None:
        """A worker is gone: drop its blocks and what was applied of its batches."""
        for view in (self._live, self._building):
            if view is not None:
                view.index.remove_worker(worker_id)
                view.applied.pop(worker_id, None)
                view.healing.pop(worker_id, None)
                view.forgotten[worker_id] = view.forgotten.get(worker_id, 0) + 1

    async def drop_worker(self, worker_id: str) -> None:
        """:meth:`forget` the worker and remove its snapshot and batches."""
        self.forget(worker_id)
        await drop_worker_residency(self.bus, worker_id)

    def _rewatch(self) -> None:
        if self._task is None or self._closed:
            return
        self._task.cancel()
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while not self._closed:
            try:
                # Build a fresh index (snapshots, then the batches after them) and swap
                # it in once it is caught up; the live one serves until then.
                view = self._building = _View(ResidencyIndex())
                start = await self._load_snapshots(view)
                await self._follow(view, start)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # consumer or server gone: start over
                log.warning("residency watch failed (%r); starting over", exc)
                await asyncio.sleep(0.5)

    def _caught_up(self, view: _View) -> None:
        if self._building is view:
            self.index.replace_with(view.index)
            view.index = self.index
            self._live, self._building = view, None
        self._synced.set()

    # -- snapshots ------------------------------------------------------------------------

    async def _load_snapshots(self, view: _View) -> int:
        """Load every worker's snapshot into ``view``; the stream position to read on
        from (the oldest snapshot's)."""
        assert self.bus.residency is not None
        try:
            infos = await self.bus.residency.list(ignore_deletes=True)
        except NotFoundError:
            infos = []
        start: int | None = None
        for info in infos:
            snap = await self._read_snapshot(info.name)
            if snap is not None and self._load(view, snap):
                start = snap.stream_seq if start is None else min(start, snap.stream_seq)
        return (start or 0) + 1

    async def _read_snapshot(self, worker_id: str) -> ResidencySnapshot | None:
        data = await self._fetch_object(worker_id)
        if data is None:
            return None
        try:
            return RESIDENCY_SNAPSHOT.decode(data)
        except ProtocolError as exc:
            log.warning("ignoring the residency snapshot of %s: %s", worker_id, exc)
            return None

    async def _fetch_object(self, name: str) -> bytes | None:
        """One object of the snapshot store (None: there is none, or it was replaced
        while being read), its chunks fetched with one pull. nats-py's own ``get``
        reads them through a flow-controlled push consumer at ~15 MB/s here: a
        million-block snapshot took 0.8 s."""
        assert self.bus.residency is not None
        try:
            info = await self.bus.residency.get_info(name)
        except NotFoundError:
            return None
        if not info.size or not info.chunks:
            return b""
        bucket = self.bus.names.residency_snapshots
        psub = await self.bus.js.pull_subscribe(
            f"$O.{bucket}.C.{info.nuid}", stream=f"OBJ_{bucket}",
            config=js_api.ConsumerConfig(ack_policy=js_api.AckPolicy.NONE, mem_storage=True,
                                         inactive_threshold=30.0, num_replicas=1))
        chunks: list[bytes] = []
        try:
            while len(chunks) < info.chunks:
                got = await psub.fetch(info.chunks - len(chunks), timeout=5.0)
                chunks += [m.data for m in got]
        except TimeoutError:
            return None  # replaced meanwhile: its chunks are gone
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
        data = b"".join(chunks)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
        if info.digest is None or info.digest.partition("=")[2] != digest:
            log.warning("ignoring the residency snapshot of %s: its digest does not match",
                        name)
            return None
        return data

    def _load(self, view: _View, snap: ResidencySnapshot) -> bool:
        try:
            hashes = unpack_hashes(snap.hashes)
        except ProtocolError as exc:
            log.warning("ignoring the residency snapshot of %s: %s", snap.worker_id, exc)
            return False
        if len(hashes) != len(snap.tiers) or (snap.tiers and max(snap.tiers) >= len(TIERS)):
            log.warning("ignoring the residency snapshot of %s: %d hashes, %d tiers",
                        snap.worker_id, len(hashes), len(snap.tiers))
            return False
        if not view.index.load_worker(snap.worker_id, snap.instance, hashes, snap.tiers):
            return False  # an older incarnation than the index knows
        view.applied[snap.worker_id] = (snap.instance, snap.seq)
        self.snapshots_loaded += 1
        return True

    # -- the stream -----------------------------------------------------------------------

    async def _consumer(self, start: int) -> tuple[str, int, bool]:
        """An ephemeral, ack-less pull consumer from ``start`` on: its name, the stream's
        last sequence when it was made, and whether anything is there to read."""
        js = self.bus.js
        stream = self.bus.names.residency_stream
        last = (await js.stream_info(stream)).state.last_seq
        start = max(1, min(start, last + 1))
        info = await js.add_consumer(stream, js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
            ack_policy=js_api.AckPolicy.NONE, filter_subject=self.bus.names.residency_subjects,
            inactive_threshold=30.0, mem_storage=True, num_replicas=1))
        return info.name, last, (info.num_pending or 0) > 0 and last >= start

    async def _follow(self, view: _View, start: int) -> None:
        nc, js = self.bus.nc, self.bus.js
        stream = self.bus.names.residency_stream
        name, last, behind = await self._consumer(start)
        if not behind:
            self._caught_up(view)
        batch_done = asyncio.Event()
        received = 0
        loop = asyncio.get_running_loop()
        heard = loop.time()

        async def on_msg(msg: Msg) -> None:
            nonlocal received, behind, heard
            headers = msg.headers
            heard = loop.time()
            if headers and "Status" in headers:  # 408: the pull expired; 409: gone
                if headers["Status"] == "409":
                    log.debug("residency pull: %s", headers.get("Description"))
                elif behind:  # nothing left to read (what was pending got purged)
                    behind = False
                    self._caught_up(view)
                batch_done.set()
                return
            received += 1
            try:
                self._on_batch(view, RESIDENCY_BATCH.decode(msg.data))
            except (ProtocolError, ValueError) as exc:
                log.warning("ignoring a residency batch on %s: %s", msg.subject, exc)
            if behind:
                stream_seq, pending = _position(msg.reply)
                if pending == 0 or stream_seq >= last:
                    behind = False
                    self._caught_up(view)
            if received >= self.BATCH:
                batch_done.set()

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=4 * self.BATCH)
        request = json.dumps({"batch": self.BATCH,
                              "expires": int(self.EXPIRES * 1e9)}).encode()
        try:
            while not self._closed:
                received = 0
                batch_done.clear()
                await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}", request,
                                 reply=inbox)
                while not batch_done.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await batch_done.wait()
                    if loop.time() - heard > self.EXPIRES + 5.0:  # silence: consumer lost
                        raise TimeoutError("the residency pull went unanswered")
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await js.delete_consumer(stream, name)

    def _on_batch(self, view: _View, b: ResidencyBatch) -> None:
        """Apply one batch in order, skip one already applied, heal a gap."""
        w = b.worker_id
        held = view.healing.get(w)
        if held is not None:
            held.append(b)
            return
        inst, seq = view.applied.get(w, (0, 0))
        if b.instance < inst:
            return  # an older incarnation's
        if b.instance > inst:
            inst, seq = b.instance, 0  # a new incarnation: its batches count from 1
        if b.seq <= seq:
            return  # already in the index (a snapshot held it)
        if b.seq == seq + 1:
            stored = unpack_hashes(b.stored)
            if len(stored) != len(b.tiers) or (b.tiers and max(b.tiers) >= len(TIERS)):
                raise ProtocolError(f"residency batch {b.seq} of {w}: {len(stored)} hashes, "
                                    f"{len(b.tiers)} tiers (each < {len(TIERS)})")
            self.batches += 1
            if view.index.apply_batch(w, b.instance, stored, b.tiers,
                                      unpack_hashes(b.removed)):
                view.applied[w] = (b.instance, b.seq)
            return
        if time.monotonic() < view.quiet_until.get(w, 0.0):
            return  # a heal failed a moment ago; the next batch after the pause tries again
        self.gaps += 1
        view.healing[w] = [b]
        task = asyncio.create_task(self._heal(view, w, inst))
        self._heals.add(task)
        task.add_done_callback(self._heals.discard)

    async def _heal(self, view: _View, worker_id: str, instance: int) -> None:
        """Reload the worker's snapshot (a fresh one if the stored one is older than the
        gap), then apply the batches held meanwhile."""
        mine = view.healing[worker_id]  # batches held for this heal
        need = mine[0].seq - 1
        forgotten = view.forgotten.get(worker_id, 0)

        def covers(snap: ResidencySnapshot | None) -> bool:
            return snap is not None and (snap.instance > instance or (
                snap.instance == instance and snap.seq >= need))

        snap = None
        try:
            snap = await self._read_snapshot(worker_id)
            if not covers(snap):
                with contextlib.suppress(Exception):
                    await self.bus.nc.request(
                        self.bus.names.residency_sync_subject(worker_id), b"",
                        timeout=SYNC_TIMEOUT)
                snap = await self._read_snapshot(worker_id)
        except Exception as exc:
            log.warning("residency of %s: reading its snapshot failed: %r", worker_id, exc)
        finally:
            if view.healing.get(worker_id) is mine:  # not a later heal's (after a forget)
                del view.healing[worker_id]
            held = mine
        if view is not self._live and view is not self._building:
            return  # an index rebuilt meanwhile: this one is gone
        if view.forgotten.get(worker_id, 0) != forgotten:
            return  # the worker was dropped meanwhile
        if snap is not None and covers(snap) and self._load(view, snap):
            self.heals += 1
            for b in held:
                try:
                    self._on_batch(view, b)
                except (ProtocolError, ValueError) as exc:
                    log.warning("ignoring a residency batch of %s: %s", worker_id, exc)
            return
        self.heal_failures += 1
        log.warning("residency of %s: a gap before batch %d could not be healed; its "
                    "blocks are dropped until it can be", worker_id, need + 1)
        view.index.remove_worker(worker_id)
        view.applied.pop(worker_id, None)
        view.quiet_until[worker_id] = time.monotonic() + HEAL_BACKOFF
