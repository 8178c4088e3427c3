"""The router role: takes requests off the request log and forwards each to one
worker's work queue.

Replicas share one durable pull consumer, so each request goes to one replica; a
replica acks only after the work queue has stored the forwarded copy, so a replica
killed mid-request leaves it un-acked and JetStream redelivers it to another after
``router_ack_wait``. The forwarded copy's de-duplication id is the request log's
sequence number, so such a redelivery never reaches a worker twice.

The router holds no state of its own: workers and their load come from the registry
buckets (see ``registry.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable

from nats.aio.msg import Msg

from dynamo_bus.bus import (
    ROUTER_MAX_DELIVER,
    Bus,
    decode_request,
    ensure_consumer,
    router_consumer_config,
)
from dynamo_bus.config import Config
from dynamo_bus.consumer import PullConsumer
from dynamo_bus.errors import ConfigError, ProtocolError
from dynamo_bus.handback import hand_back
from dynamo_bus.messages import (
    CANCEL,
    RESPONSE,
    ROUTING_STRATEGIES,
    Error,
    Registration,
    Request,
)
from dynamo_bus.recent import RecentIds
from dynamo_bus.registry import Registry
from dynamo_bus.worker import WORK_ACK_WAIT

log = logging.getLogger(__name__)


Policy = Callable[[Request, list[Registration]], Registration]


class RoutingPolicy:
    """Picks a worker among live candidates. Strategies are per request overridable."""

    def __init__(self, registry: Registry, default: str, *, rng: random.Random | None = None):
        if default not in ROUTING_STRATEGIES:
            raise ConfigError(f"unknown routing strategy {default!r}; one of "
                              f"{', '.join(ROUTING_STRATEGIES)} (flag --router-mode, "
                              "env DYNAMO_BUS_ROUTER_MODE)")
        self.registry = registry
        self.default = default
        self._rng = rng or random.Random()
        self._rr: dict[str, int] = defaultdict(int)
        # Requests this replica sent since the worker's last load report: the load
        # bucket lags, so without this a burst would all go to the same worker.
        self._sent_since: dict[str, int] = defaultdict(int)
        self._seen_load_at: dict[str, float] = {}

    def candidates(self, req: Request) -> list[Registration]:
        workers = self.registry.workers(req.model)
        excluded = set(req.routing.exclude_workers)
        return sorted((w for w in workers if w.worker_id not in excluded),
                      key=lambda w: w.worker_id)

    def pick(self, req: Request, workers: list[Registration]) -> Registration:
        strategy = req.routing.strategy or self.default
        if req.routing.worker_id:
            strategy = "direct"
        if strategy == "direct":
            for w in workers:
                if w.worker_id == req.routing.worker_id:
                    return w
            raise LookupError(f"worker {req.routing.worker_id!r} is not serving {req.model}")
        if strategy == "random":
            return self._rng.choice(workers)
        if strategy == "least_loaded":
            return min(workers, key=self._load_score)
        # round_robin
        i = self._rr[req.model] % len(workers)
        self._rr[req.model] += 1
        return workers[i]

    def _load_score(self, w: Registration) -> float:
        load = self.registry.load(w.worker_id)
        wid = w.worker_id
        if load is not None and load.at != self._seen_load_at.get(wid):
            self._seen_load_at[wid] = load.at
            self._sent_since[wid] = 0
        active = (load.active_requests if load else 0) + self._sent_since[wid]
        return active / max(w.capacity, 1) + self._rng.random() * 1e-6

    def sent(self, worker_id: str) -> None:
        self._sent_since[worker_id] += 1

    def forget(self, worker_id: str) -> None:
        self._sent_since.pop(worker_id, None)
        self._seen_load_at.pop(worker_id, None)


class Router:
    def __init__(self, bus: Bus, cfg: Config, *, registry: Registry | None = None) -> None:
        self.bus = bus
        self.cfg = cfg
        self.registry = registry or Registry(bus, ttl=cfg.worker_ttl)
        self._own_registry = registry is None
        self.policy = RoutingPolicy(self.registry, cfg.router_mode)
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
        await self._consumer.close(timeout=5.0)
        with contextlib.suppress(Exception):
            await self._cancel_sub.unsubscribe()
        if self._own_registry:
            await self.registry.stop()

    def _on_worker_removed(self, worker_id: str) -> None:
        self.policy.forget(worker_id)
        if worker_id not in self._sweeps:
            task = asyncio.create_task(self._sweep(worker_id))
            self._sweeps[worker_id] = task
            task.add_done_callback(lambda _: self._sweeps.pop(worker_id, None))

    async def _sweep(self, worker_id: str) -> None:
        """A worker vanished (no heartbeat): send what waits in its queue elsewhere.

        Runs past the work queue's ack wait, so requests the worker took but never
        finished come back and are swept too; then removes the worker's consumer. A
        worker that reappears keeps its queue."""
        names = self.bus.names
        gone = asyncio.Event()  # the worker's consumer does not exist: nothing to sweep

        async def _gone() -> None:
            gone.set()

        sweeper = PullConsumer(
            self.bus.nc, names.work_stream, names.worker_consumer(worker_id), capacity=64,
            handler=lambda msg: hand_back(self.bus, msg, worker_id), on_missing=_gone,
            expires=1.0)
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
        if self.registry.get(worker_id) is None and not gone.is_set():
            with contextlib.suppress(Exception):
                await self.bus.js.delete_consumer(names.work_stream,
                                                  names.worker_consumer(worker_id))

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
        workers = self.policy.candidates(req)
        if not workers:
            await self._reject(msg, req, 503, "no_worker",
                               f"no live worker serves model {req.model!r}")
            return
        try:
            worker = self.policy.pick(req, workers)
        except LookupError as exc:
            await self._reject(msg, req, 400, "invalid_value", str(exc), "routing_strategy")
            return
        seq = msg.metadata.sequence.stream
        try:
            await self.bus.js.publish(worker.work_subject, msg.data,
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
        self.policy.sent(worker.worker_id)
        self.routed += 1
        await msg.ack()

    async def _reject(self, msg: Msg, req: Request, status: int, code: str, message: str,
                      param: str | None = None) -> None:
        err = Error(request_id=req.request_id, status=status, message=message, code=code,
                    param=param)
        with contextlib.suppress(Exception):
            await self.bus.nc.publish(req.reply_to, RESPONSE.encode(err))
        await msg.ack()
