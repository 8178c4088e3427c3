"""The router role: takes requests off the request log and forwards each to one
worker's work queue.

Replicas share one durable pull consumer, so each request goes to one replica; a
replica acks only after the work queue has stored the forwarded copy, so a replica
killed mid-request leaves it un-acked and JetStream redelivers it to another after
``router_ack_wait``. The forwarded copy's de-duplication id is the request log's
sequence number, so such a redelivery never reaches a worker twice.

The router holds no state of its own: workers and their load come from the registry
buckets (see ``registry.py``), which worker holds which KV blocks from the residency
stream and snapshots (``residency_watch.py``); the choice itself is ``policy.py``.

Disaggregated serving: the request goes to a worker that decodes (aggregated or
decode role). When that is a decode worker, prefill workers serve the model and the
prompt's part the decode worker does not hold has at least
``--disagg-min-prefill-tokens`` tokens, it goes to a prefill worker instead (the cheapest
by the same cost over the prefill workers), naming the decode worker in
``Request.decode_to`` (``--disagg-affinity``); the prefill worker hands it on (see
``worker/disagg.py``). A vanished decode worker's unclaimed descriptors are moved to
its model's shared subject, where any decode worker claims them.

When every eligible worker is busy (``--router-busy-kv``, ``--router-busy-prefill-tokens``)
a request waits in this router's queue, highest ``priority`` first and first come first
served within a priority, up to ``--router-queue-size`` requests; beyond that, or with
no queue, it is answered 503. A queued request stays un-acked (kept alive with
in-progress acks), so a replica that dies with a queue loses none of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from dynamo_bus.bus.connection import (
    ROUTER_MAX_DELIVER,
    WORK_ACK_WAIT,
    Bus,
    decode_request,
    ensure_consumer,
    router_consumer_config,
)
from dynamo_bus.bus.consumer import PullConsumer
from dynamo_bus.bus.handback import hand_back, unsteer
from dynamo_bus.bus.messages import CANCEL, REQUEST, RESPONSE, Error, Request
from dynamo_bus.bus.recent import RecentIds
from dynamo_bus.bus.registry import Registry
from dynamo_bus.config import Config
from dynamo_bus.errors import NoWorker, ProtocolError
from dynamo_bus.hashing import sequence_hashes
from dynamo_bus.routing.policy import (
    AllBusy,
    Decision,
    KvWeights,
    NoEligibleWorker,
    RoutingPolicy,
    UnknownWorker,
)
from dynamo_bus.routing.residency_watch import ResidencyWatcher

log = logging.getLogger(__name__)


class _Cancelled(Exception):
    """A queued request was cancelled by its client."""


class Router:
    def __init__(self, bus: Bus, cfg: Config, *, registry: Registry | None = None) -> None:
        self.bus = bus
        self.cfg = cfg
        self.registry = registry or Registry(bus, ttl=cfg.worker_ttl)
        self._own_registry = registry is None
        self.residency = ResidencyWatcher(bus)
        self.policy = RoutingPolicy(
            self.registry, cfg.router_mode, block_size=cfg.block_size,
            index=self.residency.index,
            weights=KvWeights(overlap_weight=cfg.router_overlap_weight,
                              temperature=cfg.router_temperature),
            busy_kv=cfg.router_busy_kv, busy_prefill_tokens=cfg.router_busy_prefill_tokens)
        # Requests waiting for a worker that is not busy: (-priority, arrival, ...).
        self._queue: list[tuple[int, int, Request, list[int] | None,
                                asyncio.Future[Decision]]] = []
        self._arrivals = itertools.count()
        self._queued = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        names = bus.names
        self._consumer = PullConsumer(bus.nc, names.request_stream, names.router_consumer,
                                      capacity=cfg.router_max_inflight, handler=self._handle,
                                      on_missing=self._ensure_consumer)
        self._cancelled = RecentIds()
        self._sweeps: dict[str, asyncio.Task[None]] = {}
        self.routed = 0

    async def _ensure_consumer(self) -> None:
        await ensure_consumer(self.bus.js, self.bus.names.request_stream,
                              router_consumer_config(self.bus.names, self.cfg))

    async def start(self) -> None:
        if self._own_registry:
            await self.registry.start()
        await self.residency.start()
        self._dispatcher = asyncio.create_task(self._dispatch())
        self._cancel_sub = await self.bus.nc.subscribe(self.bus.names.cancel_subject,
                                                       cb=self._on_cancel)
        self.registry.on_removed.append(self._on_worker_removed)
        self.bus.on_reconnect.append(self._consumer.on_reconnect)
        await self._consumer.start()
        log.info("router up (default strategy %s)", self.policy.default)

    async def stop(self) -> None:
        for task in self._sweeps.values():
            task.cancel()
        await asyncio.gather(*self._sweeps.values(), return_exceptions=True)
        self._consumer.stop_fetching()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.wait({self._dispatcher}, timeout=5.0)
        for *_, fut in self._queue:  # un-acked: another replica gets them
            fut.cancel()
        await self._consumer.close(timeout=5.0)
        await self.residency.stop()
        with contextlib.suppress(Exception):
            await self._cancel_sub.unsubscribe()
        if self._own_registry:
            await self.registry.stop()

    def _on_worker_removed(self, worker_id: str, incarnation: str) -> None:
        self.policy.forget(worker_id)
        if self.registry.get(worker_id) is not None:
            return  # a new process under the same id: its queue is its own again
        if worker_id not in self._sweeps:
            task = asyncio.create_task(self._sweep(worker_id))
            self._sweeps[worker_id] = task
            task.add_done_callback(lambda _: self._sweeps.pop(worker_id, None))

    async def _sweep(self, worker_id: str) -> None:
        """A worker vanished (no heartbeat): send what waits in its queues elsewhere,
        requests to the routers and (a decode worker's) KV descriptors to every decode
        worker.

        Runs past the queues' ack wait, so what the worker took but never finished
        comes back and is swept too; then removes the worker's consumers. A worker that
        reappears keeps its queues."""
        names = self.bus.names
        queues = [(names.work_stream, names.worker_consumer(worker_id), hand_back),
                  (names.kv_stream, names.kv_consumer(worker_id), unsteer)]
        await asyncio.gather(*(self._sweep_queue(worker_id, *q) for q in queues))
        if self.registry.get(worker_id) is None:
            await self.residency.drop_worker(worker_id)  # the blocks it held went with it

    async def _sweep_queue(self, worker_id: str, stream: str, durable: str,
                           move: Callable[[Bus, Msg, str], Awaitable[None]]) -> None:
        try:
            await self.bus.js.consumer_info(stream, durable)
        except NotFoundError:
            return  # never had this queue (a KV queue is a decode worker's)
        except Exception as exc:
            log.debug("consumer %s on %s: %r; sweeping anyway", durable, stream, exc)
        gone = asyncio.Event()  # the worker's consumer does not exist: nothing to sweep

        async def _gone() -> None:
            gone.set()

        sweeper = PullConsumer(self.bus.nc, stream, durable, capacity=64,
                               handler=lambda msg: move(self.bus, msg, worker_id),
                               on_missing=_gone, expires=1.0)
        await sweeper.start()
        back = asyncio.create_task(self.registry.wait_until(
            lambda: self.registry.get(worker_id) is not None, timeout=WORK_ACK_WAIT + 2.0))
        missing = asyncio.create_task(gone.wait())
        try:
            await asyncio.wait([back, missing], return_when=asyncio.FIRST_COMPLETED)
        finally:
            back.cancel()
            missing.cancel()
            await sweeper.close(timeout=2.0)
        if self.registry.get(worker_id) is None:
            if not gone.is_set():
                with contextlib.suppress(Exception):
                    await self.bus.js.delete_consumer(stream, durable)

    async def _on_cancel(self, msg: Msg) -> None:
        with contextlib.suppress(ProtocolError):
            self._cancelled.add(CANCEL.decode(msg.data).request_id)

    async def _handle(self, msg: Msg) -> None:
        req = await decode_request(msg)
        if req is None:
            return
        if req.request_id in self._cancelled:
            await msg.ack()
            return
        age = time.time() - req.created_ns / 1e9 if req.created_ns else 0.0
        if age > self.cfg.request_timeout:
            await self._reject(msg, req, 504, "timeout", "request expired before routing")
            return
        try:
            decision = await self._decide(req, msg)
        except _Cancelled:
            await msg.ack()  # cancelled while queued: nobody waits for an answer
            return
        except NoWorker as exc:
            await self._reject(msg, req, 503, "no_worker", exc.message)
            return
        except NoEligibleWorker as exc:
            await self._reject(msg, req, 503, "no_eligible_worker", str(exc))
            return
        except AllBusy as exc:
            await self._reject(msg, req, 503, "overloaded", f"{exc}; try again later")
            return
        except UnknownWorker as exc:
            await self._reject(msg, req, 400, "invalid_value", str(exc), "worker_id")
            return
        except LookupError as exc:
            await self._reject(msg, req, 400, "invalid_value", str(exc), "routing_strategy")
            return
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            await self._reject(msg, req, 504, "timeout", "request expired waiting for a "
                               "worker that is not busy")
            return
        if decision is None:
            await self._reject(msg, req, 503, "no_worker",
                               f"no live worker serves model {req.model!r}")
            return
        await self._forward(msg, req, decision)

    async def _forward(self, msg: Msg, req: Request, decision: Decision) -> None:
        """Store ``req`` in its worker's work queue (a prefill worker's, naming the
        decode worker, when disaggregated), then ack it off the request log."""
        worker, data = decision.worker, msg.data
        if decision.prefill is not None:
            decode_to = worker.worker_id if self.cfg.disagg_affinity else ""
            worker = decision.prefill.worker
            data = REQUEST.encode(msgspec.structs.replace(req, decode_to=decode_to))
        seq = msg.metadata.sequence.stream
        try:
            await self.bus.js.publish(worker.work_subject, data,
                                      headers={"Nats-Msg-Id": f"{req.request_id}:{seq}"})
        except Exception as exc:
            log.warning("forwarding %s to %s failed: %s", req.request_id, worker.worker_id, exc)
            if msg.metadata.num_delivered >= ROUTER_MAX_DELIVER:
                # JetStream would drop it silently after this delivery: answer instead.
                await self._reject(msg, req, 503, "overloaded",
                                   f"could not hand the request to a worker: {exc}")
            else:  # not stored: try again shortly
                await msg.nak(delay=0.5)
            return
        self.routed += 1
        log.debug("routed %s to %s (cost %.1f, %d cached blocks)", req.request_id,
                  worker.worker_id, decision.cost, decision.overlap_blocks)
        await msg.ack()

    def _try(self, req: Request, hashes: list[int] | None) -> Decision | None:
        workers = self.policy.candidates(req)
        if not workers:
            return None
        decision = self.policy.place(req, workers, hashes,
                                     min_prefill_tokens=self.cfg.disagg_min_prefill_tokens)
        self.policy.sent(req, decision)  # counted before the next request decides
        return decision

    def _waiting(self, model: str | None = None) -> int:
        """Requests in the queue still waiting (of ``model``, or all)."""
        return sum(1 for *_, req, _, fut in self._queue
                   if not fut.done() and (model is None or req.model == model))

    async def _decide(self, req: Request, msg: Msg) -> Decision | None:
        """A worker for ``req`` now, or after waiting in the queue (see the module
        docstring). Queued requests of other models do not hold this one up."""
        hashes = None
        if (req.routing.strategy or self.policy.default) == "kv_aware":
            hashes = sequence_hashes(req.token_ids, self.cfg.block_size)
        if not self._waiting(req.model):
            try:
                return self._try(req, hashes)
            except AllBusy:
                if self.cfg.router_queue_size <= 0:
                    raise
        waiting = self._waiting()
        if waiting >= self.cfg.router_queue_size:
            raise AllBusy(f"all workers serving {req.model} are busy and "
                          f"{waiting} requests wait already")
        fut: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (-req.priority, next(self._arrivals), req, hashes, fut))
        self._queued.set()
        left = self.cfg.request_timeout - (time.time() - req.created_ns / 1e9
                                           if req.created_ns else 0.0)
        try:
            async with asyncio.timeout(max(left, 0.0)):
                while True:
                    done, _ = await asyncio.wait({fut}, timeout=self.cfg.router_ack_wait / 3)
                    if done:
                        return fut.result()
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
        finally:
            fut.cancel()  # no-op once resolved; otherwise the dispatcher skips it

    def _dispatch_ready(self) -> bool:
        """Hand every queued request that can go now to its worker, best first; a
        request whose workers are all busy keeps its place, and holds back only the
        requests of its own model behind it."""
        self._queue = [e for e in self._queue if not e[-1].done()]
        heapq.heapify(self._queue)
        blocked: set[str] = set()
        handed = False
        for entry in sorted(self._queue):
            *_, req, hashes, fut = entry
            if req.model in blocked:
                continue
            if req.request_id in self._cancelled:
                fut.set_exception(_Cancelled())
                continue
            try:
                decision = self._try(req, hashes)
            except AllBusy:
                blocked.add(req.model)
                continue
            except Exception as exc:  # refused for another reason: say so
                fut.set_exception(exc)
                continue
            if decision is None:
                fut.set_exception(NoWorker(f"no live worker serves model {req.model!r}"))
            else:
                fut.set_result(decision)
            handed = True
        return handed or not self._queue

    async def _dispatch(self) -> None:
        """Wait for queued requests, then for workers to stop being busy."""
        while True:
            await self._queued.wait()
            while self._waiting():
                await self.registry.wait_until(self._dispatch_ready, timeout=1.0)
            self._queue.clear()
            self._queued.clear()

    async def _reject(self, msg: Msg, req: Request, status: int, code: str, message: str,
                      param: str | None = None) -> None:
        err = Error(request_id=req.request_id, status=status, message=message, code=code,
                    param=param)
        with contextlib.suppress(Exception):
            await self.bus.nc.publish(req.reply_to, RESPONSE.encode(err))
        await msg.ack()
