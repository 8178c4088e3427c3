"""The worker runtime: takes requests from its own work queue, runs them on an Engine,
streams tokens back over core NATS, and keeps its registration and load current.

Shutdown (``drain``) is ordered: deregister (routers stop sending) → stop fetching →
finish in-flight requests within the grace period (the rest end with a 503 error) →
hand back queued requests that were never started to the request log, so a router
sends them elsewhere → close.

Every handler is idempotent under redelivery: a request already running is left to
its run, one already finished is acked and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

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
    REQUEST,
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
from dynamo_bus.routing.residency import ResidencyPublisher

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, bus: Bus, engine: Engine, cfg: Config, *, worker_id: str,
                 model: str, tokenizer: str = "") -> None:
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
        self._running: dict[str, Msg] = {}
        self._done = RecentIds()
        self._cancelled = RecentIds()
        self._tasks: list[asyncio.Task[None]] = []
        self._load_dirty = asyncio.Event()
        self._draining = False
        self._closed = False
        self._started_at = time.time()
        # Token ids, hence block hashes, depend on the tokenizer: part of the fingerprint.
        self.fingerprint = msgspec.structs.replace(engine.fingerprint, tokenizer=tokenizer)
        self.residency = (ResidencyPublisher(bus, engine, worker_id,
                                             instance=int(self._started_at * 1e9))
                          if bus.residency_kv is not None else None)

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
        if self.residency is not None:
            await self.residency.start()
        await self._register()
        self.bus.on_reconnect.append(self._consumer.on_reconnect)
        await self._consumer.start()
        self._tasks = [asyncio.create_task(self._heartbeat()),
                       asyncio.create_task(self._publish_load()),
                       asyncio.create_task(self._keep_alive())]
        log.info("worker %s serving %s (%s, capacity %d)", self.worker_id, self.model,
                 self.engine.name, self.cfg.max_concurrency)

    def registration(self) -> Registration:
        return Registration(
            worker_id=self.worker_id, model=self.model, fingerprint=self.fingerprint,
            work_subject=self.work_subject, capacity=self.cfg.max_concurrency,
            engine=self.engine.name, pid=os.getpid(), started_at=self._started_at,
            heartbeat_at=time.time(), context_length=self.engine.context_length,
            draining=self._draining)

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
        if not await self._consumer.wait_idle(self.cfg.drain_timeout):
            for rid in list(self._running):
                await self._fail(rid, "worker is shutting down", 503)
        log.debug("drain %s: in-flight done", self.worker_id)
        await self._consumer.drain_remaining()
        log.debug("drain %s: queue handed back", self.worker_id)
        await self._consumer.close(timeout=5.0)
        await self._stop_background()
        if self.residency is not None:
            await self.residency.stop()
        with contextlib.suppress(Exception):
            await self._cancel_sub.unsubscribe()
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
                    # Routers took us for gone and may have purged our residency keys.
                    await self.residency.resync()
                last_ok = loop.time()
            self._load_dirty.set()

    async def _publish_load(self) -> None:
        while not self._closed:
            await self._load_dirty.wait()
            self._load_dirty.clear()
            el = self.engine.load()
            load = Load(worker_id=self.worker_id, active_requests=len(self._running),
                        capacity=self.cfg.max_concurrency,
                        active_prefill_tokens=el.active_prefill_tokens,
                        active_blocks=el.active_blocks, total_blocks=el.total_blocks,
                        at=time.time())
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.cfg.heartbeat_interval):
                    await self.bus.load_kv.put(self.worker_id, LOAD.encode(load))
            await asyncio.sleep(0.05)  # at most 20 load updates a second

    async def _keep_alive(self) -> None:
        """Tell JetStream long requests are still being worked on."""
        while not self._closed:
            await asyncio.sleep(WORK_ACK_WAIT / 3)
            for msg in list(self._running.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = CANCEL.decode(msg.data)
        except ProtocolError:
            return
        self._cancelled.add(cancel.request_id)
        if cancel.request_id in self._running:
            log.debug("cancel %s: %s", cancel.request_id, cancel.reason)
            await self.engine.abort(cancel.request_id)

    # -- requests ----------------------------------------------------------------
    async def _handle(self, msg: Msg) -> None:
        req = await decode_request(msg)
        if req is None:
            return
        rid = req.request_id
        if rid in self._running:
            return  # a redelivery of what is running: the first delivery acks it
        if rid in self._done or rid in self._cancelled:
            await msg.ack()
            return
        self._running[rid] = msg
        self._load_dirty.set()
        try:
            await self._generate(req)
        finally:
            del self._running[rid]
            self._done.add(rid)
            self._load_dirty.set()
            with contextlib.suppress(Exception):
                await msg.ack()

    async def _generate(self, req: Request) -> None:
        nc, rid, index, cached = self.bus.nc, req.request_id, 0, 0
        ereq = EngineRequest(request_id=rid, token_ids=req.token_ids, sampling=req.sampling)
        gen = self.engine.generate(ereq)
        held: list[int] = []  # tokens not sent yet (a non-streaming request)
        held_lp: list[float] = []  # and their logprobs, when the request asked for them
        held_top: list[list[tuple[int, float]]] = []
        if not req.stream:  # tell the requester who runs it, so it notices our death
            await nc.publish(req.reply_to, RESPONSE.encode(
                Chunk(request_id=rid, index=0, token_ids=[], worker_id=self.worker_id)))
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
                    chunk.worker_id = self.worker_id
                index += len(token_ids)
                if out.finish_reason is not None:
                    chunk.usage = Usage(prompt_tokens=len(req.token_ids),
                                        completion_tokens=index, cached_tokens=cached)
                await nc.publish(req.reply_to, RESPONSE.encode(chunk))
        except DynamoBusError as exc:
            await self._send_error(req.reply_to, rid, exc.message, exc.status, exc.code)
        except Exception as exc:
            log.exception("engine failed on request %s", rid)
            await self._send_error(req.reply_to, rid, f"engine error: {exc}", 500)
        finally:
            await gen.aclose()

    async def _send_error(self, reply_to: str, rid: str, message: str, status: int,
                          code: str = "internal_error") -> None:
        err = Error(request_id=rid, status=status, message=message, code=code)
        with contextlib.suppress(Exception):
            await self.bus.nc.publish(reply_to, RESPONSE.encode(err))

    async def _fail(self, rid: str, message: str, status: int) -> None:
        msg = self._running.get(rid)
        if msg is None:
            return
        with contextlib.suppress(ProtocolError):
            req = REQUEST.decode(msg.data)
            self._cancelled.add(rid)
            await self.engine.abort(rid)
            await self._send_error(req.reply_to, rid, message, status, "worker_shutdown")

    async def _hand_back(self, msg: Msg) -> None:
        """A request that reached us while draining: give it back to the routers."""
        await hand_back(self.bus, msg, self.worker_id)
