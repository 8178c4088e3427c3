"""Which worker holds which KV blocks: the residency bucket, its writers and readers.

Workers write, routers read, nobody else keeps the truth:

* a worker's :class:`ResidencyPublisher` drains its engine's residency changes every
  ``interval`` and puts one key per block it holds (``<worker_id>.<block hash>``, value
  :class:`~dynamo_bus.bus.messages.Residency`: the fastest tier holding it and the worker's
  incarnation) or purges the key of a block it evicted. Puts are pipelined: acked by
  JetStream, with a bounded number in flight (no round trip per block). A purge
  leaves a marker that expires after ``RESIDENCY_MARKER_TTL``. A worker purges its own
  keys when it starts and when it leaves.
* a router's :class:`ResidencyWatcher` rebuilds a
  :class:`~dynamo_bus.routing.kv_index.ResidencyIndex` (block hash -> worker -> tier) from the
  bucket's contents and then follows its changes. A router that restarts, or a second
  replica, reads the same bucket and builds the same index.

A newer incarnation of a worker (a restart under the same id) replaces everything the
older one held, whichever of its keys or its registration the router hears first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, Protocol

from nats.aio.msg import Msg
from nats.js import api as js_api

from dynamo_bus.bus.connection import RESIDENCY_MARKER_TTL, Bus
from dynamo_bus.bus.messages import RESIDENCY, TIERS, Residency
from dynamo_bus.errors import ProtocolError
from dynamo_bus.routing.kv_index import ResidencyIndex

log = logging.getLogger(__name__)

class ResidencySource(Protocol):
    """What a publisher reads: an engine (``Engine.residency_changes`` and
    ``residency_snapshot``)."""

    def residency_changes(self) -> dict[int, str | None]: ...

    def residency_snapshot(self) -> dict[int, str]: ...


_PURGE = {"KV-Operation": "PURGE", "Nats-Rollup": "sub",
          "Nats-TTL": f"{int(RESIDENCY_MARKER_TTL)}s"}


class ResidencyPublisher:
    """A worker's side: publishes its engine's residency changes; see the module
    docstring.

    Puts go out as plain publishes with a reply subject, and JetStream's acks come back
    on one subscription (nats.go's ``PublishAsync``): no round trip per block, yet at
    most ``window`` keys unacknowledged, so a burst (a first snapshot, a wave of
    evictions) never outruns the server, which would drop what it cannot store. What is
    not acknowledged within ``ack_timeout`` is sent again, and only a key's latest word:
    a put whose ack was lost never comes back after the key's purge. Changes taken from
    the engine stay here until sent, so a send that fails loses none of them.
    """

    def __init__(self, bus: Bus, engine: ResidencySource, worker_id: str, *, instance: int,
                 interval: float = 0.02, window: int = 4096, ack_timeout: float = 2.0) -> None:
        self.bus = bus
        self.engine = engine
        self.worker_id = worker_id
        self.instance = instance
        self.interval = interval
        self.window = window
        self.ack_timeout = ack_timeout
        self.published = 0
        self.resent = 0
        self._inbox = bus.nc.new_inbox()
        self._sub: Any = None
        self._seq = 0
        self._pending: dict[int, str | None] = {}  # taken from the engine, not sent yet
        # subject -> (seq, payload, headers, loop time sent) until JetStream acks it
        self._unacked: dict[str, tuple[int, bytes, dict[str, str] | None, float]] = {}
        self._subject_of: dict[int, str] = {}     # seq -> subject, for the acks
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._values = {t: RESIDENCY.encode(Residency(tier=t, instance=instance))  # type: ignore[arg-type]
                        for t in TIERS}

    async def purge(self) -> None:
        """Remove every key of this worker from the bucket."""
        names = self.bus.names
        with contextlib.suppress(Exception):
            await self.bus.js.purge_stream(f"KV_{names.residency_bucket}",
                                           subject=names.residency_subjects(self.worker_id))

    async def start(self) -> None:
        await self.purge()  # what an earlier incarnation left
        if self._sub is None:
            self._sub = await self.bus.nc.subscribe(self._inbox + ".*", cb=self._on_ack)
        self._task = asyncio.create_task(self._run(), name=f"residency-{self.worker_id}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        await self.purge()

    async def resync(self) -> None:
        """Publish everything the engine holds again (after the worker was away long
        enough for routers to purge its keys)."""
        self.engine.residency_changes()  # older than the snapshot below
        self._unacked.clear()
        self._subject_of.clear()
        self._room.set()
        self._pending = dict(self.engine.residency_snapshot())
        log.info("worker %s: publishing its %d cached blocks again", self.worker_id,
                 len(self._pending))

    async def _on_ack(self, msg: Msg) -> None:
        subject = self._subject_of.pop(int(msg.subject.rpartition(".")[2]), None)
        if subject is None:
            return  # a resent or replaced put's late ack
        if msg.headers and msg.headers.get("Status") == "503":
            return  # no stream right now: stays unacked and is sent again
        if b'"error"' in msg.data:
            log.warning("residency put %s refused: %s", subject, msg.data[:200])
        self._unacked.pop(subject, None)
        if len(self._unacked) < self.window:
            self._room.set()

    async def _send(self, subject: str, payload: bytes,
                    headers: dict[str, str] | None) -> None:
        while len(self._unacked) >= self.window and subject not in self._unacked:
            self._room.clear()
            try:
                async with asyncio.timeout(self.ack_timeout):
                    await self._room.wait()
            except TimeoutError:
                await self.resend_overdue()
        self._seq += 1
        old = self._unacked.get(subject)
        if old is not None:
            self._subject_of.pop(old[0], None)  # superseded: only the latest counts
        self._unacked[subject] = (self._seq, payload, headers,
                                  asyncio.get_running_loop().time())
        self._subject_of[self._seq] = subject
        await self.bus.nc.publish(subject, payload, reply=f"{self._inbox}.{self._seq}",
                                  headers=headers)

    async def resend_overdue(self) -> None:
        now = asyncio.get_running_loop().time()
        for subject, (_, payload, headers, sent) in list(self._unacked.items()):
            if now - sent >= self.ack_timeout and subject in self._unacked:
                self.resent += 1
                await self._send(subject, payload, headers)

    async def publish_changes(self) -> int:
        """Publish what changed since the last call; returns how many keys."""
        pending = self._pending
        pending.update(self.engine.residency_changes())
        # names.residency_subject, without validating the worker id once per block
        prefix = self.bus.names.residency_subject(self.worker_id, 0)[:-16]
        sent = 0
        for block_hash, tier in list(pending.items()):
            if self._pending is not pending:
                break  # resynced meanwhile: the snapshot goes next
            subject = f"{prefix}{block_hash:016x}"
            if tier is None:
                await self._send(subject, b"", _PURGE)
            else:
                await self._send(subject, self._values[tier], None)
            if pending.get(block_hash, ...) == tier:
                del pending[block_hash]
            sent += 1
        self.published += sent
        return sent

    async def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the server has stored everything published; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._unacked or self._pending) and loop.time() < deadline:
            await asyncio.sleep(0.01)
            await self.resend_overdue()
        return not self._unacked and not self._pending

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.publish_changes()
                await self.resend_overdue()
            except Exception as exc:  # the connection is away; it reconnects
                log.warning("residency publish failed: %r", exc)
            await asyncio.sleep(self.interval)


def _position(reply: str) -> tuple[int, int]:
    """A message's stream sequence and how many are still pending after it, from its
    JetStream ack subject (``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.
    <pending>``, or the form with domain and account hash before the stream and a token
    after)."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[8])
    return int(tokens[7]), int(tokens[10])


class ResidencyWatcher:
    """A router's side: keeps :attr:`index` equal to the bucket's contents.

    It reads the bucket through an ephemeral pull consumer (no acks, last value per key
    first, then every change) in batches it asks for, so a burst of puts can never
    overrun it the way a push watch is overrun (the client drops what it cannot keep
    up with). If the consumer or the connection goes, it starts over with a fresh
    index, swapped in once the bucket's contents are all read."""

    BATCH = 4096
    EXPIRES = 1.0  # seconds a pull waits for news

    def __init__(self, bus: Bus, index: ResidencyIndex | None = None) -> None:
        if bus.residency_kv is None:
            raise RuntimeError("the bus was opened without the residency bucket")
        self.bus = bus
        self._bucket = bus.names.residency_bucket
        self._prefix = len(f"$KV.{self._bucket}.")
        self.index = index if index is not None else ResidencyIndex()
        self._fresh: ResidencyIndex | None = None  # being rebuilt after a restart
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._synced = asyncio.Event()
        bus.on_reconnect.append(self._rewatch)

    async def start(self, wait: float = 10.0) -> None:
        """Start watching; waits up to ``wait`` s for the bucket's contents (routing
        goes on with a partial index past that)."""
        self._task = asyncio.create_task(self._watch())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._synced.wait()

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)

    def _rewatch(self) -> None:
        if self._task is None or self._closed:
            return
        self._task.cancel()
        self._task = asyncio.create_task(self._watch(again=True))

    async def _watch(self, *, again: bool = False) -> None:
        while not self._closed:
            try:
                if again:
                    # Deletes made meanwhile may not be replayed (markers expire, a
                    # stream purge leaves none): rebuild from the contents and swap
                    # when they are all in.
                    self._fresh = ResidencyIndex()
                again = True
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # consumer or server gone: start over
                log.warning("residency watch failed (%r); starting over", exc)
                await asyncio.sleep(0.5)

    async def _follow(self) -> None:
        nc, js = self.bus.nc, self.bus.js
        stream = f"KV_{self._bucket}"
        info = await js.add_consumer(stream, js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=js_api.AckPolicy.NONE, filter_subject=f"$KV.{self._bucket}.>",
            inactive_threshold=30.0, mem_storage=True, num_replicas=1))
        name = info.name
        # The contents are read once the stream's last message at creation is: under
        # steady puts "nothing pending" may never come.
        last = (await js.stream_info(stream)).state.last_seq
        snapshot = (info.num_pending or 0) > 0
        if not snapshot:
            self._snapshot_done()
        batch_done = asyncio.Event()
        received = 0

        async def on_msg(msg: Msg) -> None:
            nonlocal received, snapshot
            headers = msg.headers
            if headers and "Status" in headers:  # 408: the pull expired; 409: gone
                if headers["Status"] == "409":
                    log.debug("residency pull: %s", headers.get("Description"))
                batch_done.set()
                return
            deleted = not msg.data or bool(headers and headers.get("KV-Operation"))
            self._apply(msg.subject[self._prefix:], None if deleted else msg.data)
            received += 1
            if snapshot:
                stream_seq, pending = _position(msg.reply)
                if pending == 0 or stream_seq >= last:
                    snapshot = False
                    self._snapshot_done()
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
                async with asyncio.timeout(self.EXPIRES + 5.0):  # no answer: consumer lost
                    await batch_done.wait()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await js.delete_consumer(stream, name)

    def _snapshot_done(self) -> None:
        if self._fresh is not None:
            self.index.replace_with(self._fresh)
            self._fresh = None
        self._synced.set()

    def _apply(self, key: str, value: bytes | None) -> None:
        worker_id, _, hex_hash = key.rpartition(".")
        try:
            block_hash = int(hex_hash, 16)
            res = RESIDENCY.decode(value) if value is not None else None
        except (ValueError, ProtocolError) as exc:
            log.debug("ignoring residency key %s: %s", key, exc)
            return
        index = self._fresh if self._fresh is not None else self.index
        if res is None:
            index.apply(worker_id, block_hash, None)
        else:
            index.apply(worker_id, block_hash, res.tier, res.instance)
