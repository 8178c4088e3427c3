"""The worker runtime: takes requests from its own work queue, runs them on an Engine,
streams tokens back over core NATS, and keeps its registration and load current.

Shutdown (``drain``) is ordered: deregister (routers stop sending) → stop fetching →
finish in-flight requests within the grace period (the rest end with a 503 error) →
hand back queued requests that were never started to the request log, so a router
sends them elsewhere → close.

Every handler is idempotent under redelivery: a request already running is left to
its run, one already finished is acked and dropped.

Each run of the process has an ``incarnation`` (in its registration and on each
request's first chunk): a restart under the same id is a new incarnation, which tells
frontends and routers that what the old one ran is gone. What was sent on each token
stream is kept a while (:class:`~dynamo_bus.worker.sent.SentLog`) and sent again when a
requester asks (``Resend``). A worker that finds its registration lapsed (it was frozen,
or cut off, past its TTL) ends what it was running: the requesters have failed those
requests already.

A prefill or decode worker (``--role``) runs its requests and claims through
:mod:`dynamo_bus.worker.disagg`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.msg import Msg
from nats.js import api as js_api

from dynamo_bus.bus.connection import WORK_ACK_WAIT, Bus, decode_request, ensure_consumer
from dynamo_bus.bus.consumer import PullConsumer
from dynamo_bus.bus.handback import hand_back
from dynamo_bus.bus.messages import (
    CANCEL,
    LOAD,
    REGISTRATION,
    RESPONSE,
    Chunk,
    Error,
    Load,
    Registration,
    Request,
    Usage,
)
from dynamo_bus.bus.recent import RecentIds
from dynamo_bus.config import Config
from dynamo_bus.engines.base import Engine, EngineRequest
from dynamo_bus.errors import DynamoBusError, ProtocolError
from dynamo_bus.routing.kv_index import residency_instance
from dynamo_bus.routing.residency import ResidencyPublisher
from dynamo_bus.worker.disagg import DecodeRole, PrefillRole, open_roles
from dynamo_bus.worker.kv_share import KVShare
from dynamo_bus.worker.outbox import Outbox
from dynamo_bus.worker.sent import SentLog

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, bus: Bus, engine: Engine, cfg: Config, *, worker_id: str,
                 model: str, tokenizer: str = "", outbox: Outbox | None = None) -> None:
        self.bus = bus
        self.engine = engine
        self.cfg = cfg
        self.worker_id = worker_id
        self.model = model
        names = bus.names
        self.work_subject = names.work_subject(worker_id)
        self._consumer = PullConsumer(
            bus.nc, names.work_stream, names.worker_consumer(worker_id),
            capacity=cfg.max_concurrency, handler=self._handle, on_drain=self._hand_back,
            on_missing=self._ensure_consumer,
            expires=1.0)  # short pulls: a draining worker waits at most this for them
        self.role = cfg.role
        # What runs now, with the message to ack when it ends (a work queue's request,
        # or a decode worker's claimed descriptor).
        self._running: dict[str, tuple[Msg, Request]] = {}
        self._done = RecentIds()
        self._cancelled = RecentIds()
        self._tasks: list[asyncio.Task[None]] = []
        self._load_dirty = asyncio.Event()
        self._draining = False
        self._closed = False
        self._started_at = time.time()
        self.incarnation = uuid.uuid4().hex[:16]
        self._sent = SentLog()
        # Shared with the other workers on ``bus`` when the caller passes one.
        self._outbox = outbox if outbox is not None else Outbox(bus.nc)
        # Token ids, hence block hashes, depend on the tokenizer: part of the fingerprint.
        self.fingerprint = msgspec.structs.replace(engine.fingerprint, tokenizer=tokenizer)
        self.residency = (ResidencyPublisher(bus, engine, worker_id,
                                             instance=residency_instance(self._started_at))
                          if bus.residency is not None else None)
        self.share: KVShare | None = None
        self.prefill: PrefillRole | None = None
        self.decode: DecodeRole | None = None

    # -- lifecycle ---------------------------------------------------------------
    async def _ensure_consumer(self) -> None:
        names = self.bus.names
        await ensure_consumer(self.bus.js, names.work_stream, js_api.ConsumerConfig(
            durable_name=names.worker_consumer(self.worker_id),
            filter_subject=self.work_subject, ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=WORK_ACK_WAIT, max_ack_pending=self.cfg.max_concurrency * 2,
            inactive_threshold=3600.0,
        ))

    async def start(self) -> None:
        names = self.bus.names
        await self._ensure_consumer()
        self._cancel_sub = await self.bus.nc.subscribe(names.cancel_subject, cb=self._on_cancel)
        self._resend_sub = await self.bus.nc.subscribe(names.resend_subject, cb=self._on_resend)
        if self.residency is not None:
            await self.residency.start()
        if self.role != "aggregated":
            self.share, self.prefill, self.decode = await open_roles(self)
        await self._register()
        self.bus.on_reconnect.append(self._consumer.on_reconnect)
        await self._consumer.start()
        if self.decode is not None:
            await self.decode.start()
        self._tasks = [asyncio.create_task(self._heartbeat()),
                       asyncio.create_task(self._publish_load()),
                       asyncio.create_task(self._keep_alive())]
        log.info("worker %s serving %s (%s, %s, capacity %d)", self.worker_id, self.model,
                 self.role, self.engine.name, self.cfg.max_concurrency)

    def registration(self) -> Registration:
        return Registration(
            worker_id=self.worker_id, model=self.model, fingerprint=self.fingerprint,
            work_subject=self.work_subject, capacity=self.cfg.max_concurrency,
            engine=self.engine.name, pid=os.getpid(), started_at=self._started_at,
            heartbeat_at=time.time(), context_length=self.engine.context_length,
            draining=self._draining, incarnation=self.incarnation, role=self.role)

    async def _register(self) -> None:
        await self.bus.workers_kv.put(self.worker_id, REGISTRATION.encode(self.registration()))

    async def drain(self) -> None:
        """Graceful shutdown; see the module docstring. Idempotent."""
        if self._draining:
            return
        self._draining = True
        log.info("worker %s draining (%d in flight)", self.worker_id, len(self._running))
        # Still registered (heartbeats go on) but marked draining: routers stop
        # sending, clients streaming from us are not told we died.
        with contextlib.suppress(Exception):
            await self._register()
        self._consumer.stop_fetching()
        if self.decode is not None:
            self.decode.stop_fetching()
        idle = await self._consumer.wait_idle(self.cfg.drain_timeout)
        if self.decode is not None:
            idle = await self.decode.wait_idle(1.0 if not idle else self.cfg.drain_timeout)
        if not idle:
            for rid in list(self._running):
                await self._fail(rid, "worker is shutting down", 503)
        log.debug("drain %s: in-flight done", self.worker_id)
        await self._consumer.drain_remaining()
        log.debug("drain %s: queue handed back", self.worker_id)
        await self._consumer.close(timeout=5.0)
        if self.decode is not None:
            await self.decode.close()
        if self.share is not None:  # readers of what it lent get their time first
            await self.share.settle(self.cfg.drain_timeout)
            await self.share.stop()
        await self._outbox.close()
        await self._stop_background()
        if self.residency is not None:
            await self.residency.stop()
        for sub in (self._cancel_sub, self._resend_sub):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self.bus.workers_kv.delete(self.worker_id)
            await self.bus.load_kv.delete(self.worker_id)
        log.info("worker %s drained", self.worker_id)

    async def _stop_background(self) -> None:
        # The loops also check ``_closed``: on 3.11 a cancel that lands as an
        # asyncio.timeout expires comes out as TimeoutError, which they survive.
        self._closed = True
        self._load_dirty.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)

    # -- background --------------------------------------------------------------
    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while not self._closed:
            await asyncio.sleep(self.cfg.heartbeat_interval)
            if loop.time() - last_ok > self.cfg.worker_ttl:
                await self._lapsed(loop.time() - last_ok)
            try:
                # Bounded: a put sent as the server went away is never answered, and
                # waiting out the default timeout would outlive our registration's TTL.
                # (asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the
                # cancellation that stops this loop, and drain would wait forever.)
                async with asyncio.timeout(self.cfg.heartbeat_interval):
                    await self._register()
            except Exception as exc:  # server away: keep trying, it reconnects
                log.warning("heartbeat failed: %r", exc)
            else:
                if loop.time() - last_ok > self.cfg.worker_ttl and self.residency is not None:
                    # Routers took us for gone and may have dropped our blocks.
                    await self.residency.resync()
                last_ok = loop.time()
            self._load_dirty.set()

    async def _lapsed(self, silent_s: float) -> None:
        """Our registration expired while we were silent (frozen, or cut off from the
        server): frontends have failed what we were running and routers may have sent
        our queue elsewhere. Stop generating answers nobody will take."""
        failed = [rid for rid in self._running if rid not in self._cancelled]
        if not failed:
            return
        log.warning("worker %s was silent for %.1f s, past its TTL; ending %d requests the "
                    "frontends already failed", self.worker_id, silent_s, len(failed))
        for rid in failed:
            await self._fail(rid, f"worker {self.worker_id} was unreachable for {silent_s:.0f} "
                             "s, past its TTL", 503, "worker_lost")

    async def _publish_load(self) -> None:
        while not self._closed:
            await self._load_dirty.wait()
            self._load_dirty.clear()
            el = self.engine.load()
            load = Load(worker_id=self.worker_id, active_requests=len(self._running),
                        capacity=self.cfg.max_concurrency,
                        active_prefill_tokens=el.active_prefill_tokens,
                        active_blocks=el.active_blocks, total_blocks=el.total_blocks,
                        at=time.time(), tier_blocks=el.tier_blocks,
                        tier_capacity=el.tier_capacity, tier_moves=el.tier_moves,
                        disagg=self.disagg_counts())
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.cfg.heartbeat_interval):
                    await self.bus.load_kv.put(self.worker_id, LOAD.encode(load))
            await asyncio.sleep(0.05)  # at most 20 load updates a second

    async def _keep_alive(self) -> None:
        """Tell JetStream long requests are still being worked on."""
        while not self._closed:
            await asyncio.sleep(WORK_ACK_WAIT / 3)
            for msg, _ in list(self._running.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    def disagg_counts(self) -> dict[str, int]:
        """The prefill or decode role's counters (empty for an aggregated worker)."""
        role = self.prefill or self.decode
        return dict(role.counts) if role is not None else {}

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = CANCEL.decode(msg.data)
        except ProtocolError:
            return
        self._cancelled.add(cancel.request_id)
        if cancel.request_id in self._running:
            log.debug("cancel %s: %s", cancel.request_id, cancel.reason)
            await self.engine.abort(cancel.request_id)

    async def _on_resend(self, msg: Msg) -> None:
        await self._sent.answer(msg, self.bus.nc, self.worker_id, self.incarnation)

    # -- requests ----------------------------------------------------------------
    async def _handle(self, msg: Msg) -> None:
        req = await decode_request(msg)
        if req is None:
            return
        await self._serve(msg, req, self.prefill.run if self.prefill is not None
                          else self._generate)

    async def _serve(self, msg: Msg, req: Request,
                     run: Callable[[Request], Awaitable[None]]) -> None:
        """Run ``req`` (from ``msg``) once: ack it when done, whatever happened."""
        rid = req.request_id
        if rid in self._running:
            return  # a redelivery of what is running: the first delivery acks it
        if rid in self._done or rid in self._cancelled:
            await msg.ack()
            return
        self._running[rid] = (msg, req)
        self._sent.open(rid, req.reply_to)
        self._load_dirty.set()
        try:
            await run(req)
        finally:
            del self._running[rid]
            self._sent.close(rid)
            self._done.add(rid)
            self._load_dirty.set()
            await self._outbox.flush()  # the answer's end leaves before the ack
            with contextlib.suppress(Exception):
                await msg.ack()

    async def _generate(self, req: Request, *, named: bool = False) -> None:
        """Run ``req`` on the engine and stream its tokens (``named``: the first chunk,
        naming this worker, went out already)."""
        rid, index, cached = req.request_id, 0, 0
        ereq = EngineRequest(request_id=rid, token_ids=req.token_ids, sampling=req.sampling,
                             stream=req.stream)
        gen = self.engine.generate(ereq)
        held: list[int] = []  # tokens not sent yet (a non-streaming request)
        held_lp: list[float] = []  # and their logprobs, when the request asked for them
        held_top: list[list[tuple[int, float]]] = []
        # Tell the requester who runs it (and which run of us), so it notices our death.
        if not named:
            await self._send(req, Chunk(request_id=rid, index=0, token_ids=[],
                                        worker_id=self.worker_id, incarnation=self.incarnation))
        try:
            async for out in gen:
                if index == 0 and not held:
                    cached = out.cached_tokens
                if not req.stream and out.finish_reason is None:
                    held += out.token_ids
                    held_lp += out.logprobs or []
                    held_top += out.top_logprobs or []
                    continue
                token_ids, logprobs, top = out.token_ids, out.logprobs, out.top_logprobs
                if held:
                    token_ids, held = held + token_ids, []
                    logprobs, held_lp = (held_lp + (logprobs or [])) or None, []
                    top, held_top = (held_top + (top or [])) or None, []
                chunk = Chunk(request_id=rid, index=index, token_ids=token_ids,
                              finish_reason=out.finish_reason, logprobs=logprobs,
                              top_logprobs=top)
                if index == 0:
                    chunk.worker_id, chunk.incarnation = self.worker_id, self.incarnation
                index += len(token_ids)
                if out.finish_reason is not None:
                    chunk.usage = Usage(prompt_tokens=len(req.token_ids),
                                        completion_tokens=index, cached_tokens=cached)
                await self._send(req, chunk)
        except DynamoBusError as exc:
            await self._send_error(req, exc.message, exc.status, exc.code)
        except Exception as exc:
            log.exception("engine failed on request %s", rid)
            await self._send_error(req, f"engine error: {exc}", 500)
        finally:
            await gen.aclose()

    async def _send(self, req: Request, chunk: Chunk) -> None:
        data = RESPONSE.encode(chunk)
        # Kept in the log even when the publish fails: a requester asks for it again.
        self._sent.add(req.request_id, chunk.index, len(chunk.token_ids), data)
        await self._publish(req, data)

    async def _send_error(self, req: Request, message: str, status: int,
                          code: str = "internal_error") -> None:
        rid = req.request_id
        data = RESPONSE.encode(Error(request_id=rid, status=status, message=message, code=code))
        self._sent.add(rid, 0, -1, data)
        await self._publish(req, data)

    async def _publish(self, req: Request, data: bytes) -> None:
        if req.batch_to:  # with the other chunks of this engine step for that requester
            self._outbox.put(req.batch_to, data)
            return
        with contextlib.suppress(Exception):
            await self.bus.nc.publish(req.reply_to, data)

    async def _fail(self, rid: str, message: str, status: int,
                    code: str = "worker_shutdown") -> None:
        running = self._running.get(rid)
        if running is None:
            return
        req = running[1]
        self._cancelled.add(rid)
        await self.engine.abort(rid)
        await self._send_error(req, message, status, code)

    async def _hand_back(self, msg: Msg) -> None:
        """A request that reached us while draining: give it back to the routers."""
        await hand_back(self.bus, msg, self.worker_id)
