"""The connection to NATS and the JetStream topology every role relies on.

``ensure_topology`` is idempotent: every role calls it at start-up, the first one
creates the streams, consumer and buckets, later ones (and restarts) find them and
update them only where the configuration in this code changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from dynamo_bus.bus.messages import REQUEST, Request
from dynamo_bus.bus.subjects import Names
from dynamo_bus.config import Config
from dynamo_bus.errors import NoWorker, ProtocolError

log = logging.getLogger(__name__)

REQUEST_LOG_MAX_AGE = 24 * 3600.0  # the request log is kept a day for record / replay
DEDUPE_WINDOW = 120.0


@dataclass
class Bus:
    """A connection plus the handles every role uses."""

    nc: NATS
    js: JetStreamContext
    names: Names
    workers_kv: KeyValue
    load_kv: KeyValue
    residency: ObjectStore | None = None  # snapshots; None for clients that only submit
    # Called after the connection comes back: pull requests do not survive a
    # reconnect, so each PullConsumer registers here to pull again.
    on_reconnect: list[Callable[[], None]] = field(default_factory=list)

    async def close(self, timeout: float = 5.0) -> None:
        """Drain (deliver what is buffered), bounded: with the server gone a drain
        would wait for a reconnect that may never come."""
        if self.nc.is_closed:
            return
        try:
            async with asyncio.timeout(timeout):
                await self.nc.drain()
        except Exception:
            await self.nc.close()


async def decode_request(msg: Msg) -> Request | None:
    """The Request in a JetStream message, or None after terminating a message that is
    not one (it would fail the same way on every redelivery)."""
    try:
        return REQUEST.decode(msg.data)
    except ProtocolError as exc:
        log.warning("dropping undecodable message on %s: %s", msg.subject, exc)
        await msg.term()
        return None


async def connect(url: str, *, name: str,
                  on_reconnect: list[Callable[[], None]] | None = None) -> NATS:
    async def _error_cb(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    async def _reconnected_cb() -> None:
        log.info("nats: reconnected (%s)", name)
        for cb in on_reconnect or ():
            cb()

    return await nats.connect(
        url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
        error_cb=_error_cb, reconnected_cb=_reconnected_cb, pending_size=64 * 1024 * 1024,
        flush_timeout=10, drain_timeout=5,
    )


async def _ensure_stream(js: JetStreamContext, cfg: js_api.StreamConfig) -> None:
    assert cfg.name is not None
    try:
        info = await js.stream_info(cfg.name)
    except NotFoundError:
        await js.add_stream(cfg)
        log.debug("created stream %s", cfg.name)
        return
    have = info.config
    if (have.subjects, have.max_age, have.duplicate_window) != (
            cfg.subjects, cfg.max_age, cfg.duplicate_window):
        await js.update_stream(cfg)
        log.info("updated stream %s", cfg.name)


async def _ensure_bucket(js: JetStreamContext, bucket: str, ttl: float) -> KeyValue:
    try:
        kv = await js.key_value(bucket)
    except BucketNotFoundError:
        # limit markers: watchers hear about a key whose TTL ran out, not only deletes.
        # File storage: a restarted server still has the bucket (memory buckets vanish,
        # and every put and watch would fail until something re-created them).
        return await js.create_key_value(bucket=bucket, ttl=ttl, history=1,
                                         limit_marker_ttl=max(ttl, 1.0),
                                         storage=js_api.StorageType.FILE)
    status = await kv.status()
    if status.ttl is None or abs(status.ttl - ttl) > 1e-3:
        info = await js.stream_info(f"KV_{bucket}")
        info.config.max_age = ttl
        await js.update_stream(info.config)
        log.info("bucket %s: ttl now %.1fs", bucket, ttl)
    return kv


async def ensure_agents_bucket(js: JetStreamContext, names: Names) -> KeyValue:
    """The NIXL agents' bucket (file storage, no TTL: a worker's entry lives as long
    as its agent, and goes when it stops)."""
    try:
        return await js.key_value(names.agents_bucket)
    except BucketNotFoundError:
        return await js.create_key_value(bucket=names.agents_bucket, history=1,
                                         storage=js_api.StorageType.FILE)


# Residency batches are kept until a newer snapshot of their worker covers them (the
# worker then purges them) and at most this long, or this much in all.
RESIDENCY_MAX_AGE = 15 * 60.0
RESIDENCY_MAX_BYTES = 512 * 1024 * 1024


async def ensure_residency(js: JetStreamContext, names: Names) -> ObjectStore:
    """The residency stream (every worker's event batches) and the snapshot object
    store; returns the store. File storage: a restarted server keeps both."""
    await _ensure_stream(js, js_api.StreamConfig(
        name=names.residency_stream, subjects=[names.residency_subjects],
        retention=js_api.RetentionPolicy.LIMITS, storage=js_api.StorageType.FILE,
        max_age=RESIDENCY_MAX_AGE, max_bytes=RESIDENCY_MAX_BYTES,
        duplicate_window=DEDUPE_WINDOW, discard=js_api.DiscardPolicy.OLD,
    ))
    try:
        return await js.object_store(names.residency_snapshots)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_object_store(
            names.residency_snapshots,
            config=js_api.ObjectStoreConfig(storage=js_api.StorageType.FILE))


async def find_buckets(js: JetStreamContext, names: Names) -> tuple[KeyValue, KeyValue]:
    """The registry buckets of a running deployment, for clients that must not change
    its topology."""
    try:
        return await js.key_value(names.workers_bucket), await js.key_value(names.load_bucket)
    except BucketNotFoundError as exc:
        raise NoWorker(f"no dynamo-bus deployment in namespace {names.namespace!r} on this "
                       "NATS server (bucket missing); start one with `dynamo-bus serve` or "
                       "`dynamo-bus worker`") from exc


async def ensure_topology(js: JetStreamContext, names: Names,
                          cfg: Config) -> tuple[KeyValue, KeyValue]:
    """Create (or find) the request log, the work queues, the KV descriptors' stream,
    the router consumer and the registry buckets. Returns the workers and load buckets."""
    await _ensure_stream(js, js_api.StreamConfig(
        name=names.request_stream, subjects=[names.request_subjects],
        retention=js_api.RetentionPolicy.LIMITS, storage=js_api.StorageType.FILE,
        max_age=REQUEST_LOG_MAX_AGE, duplicate_window=DEDUPE_WINDOW,
        discard=js_api.DiscardPolicy.OLD,
    ))
    await _ensure_stream(js, js_api.StreamConfig(
        name=names.work_stream, subjects=[names.work_subjects],
        retention=js_api.RetentionPolicy.WORK_QUEUE, storage=js_api.StorageType.FILE,
        max_age=cfg.request_timeout,
        duplicate_window=min(DEDUPE_WINDOW, cfg.request_timeout),  # may not exceed max age
    ))
    await _ensure_stream(js, js_api.StreamConfig(
        name=names.kv_stream, subjects=[names.kv_subjects],
        retention=js_api.RetentionPolicy.WORK_QUEUE, storage=js_api.StorageType.FILE,
        max_age=cfg.request_timeout,
        duplicate_window=min(DEDUPE_WINDOW, cfg.request_timeout),
    ))
    await ensure_consumer(js, names.request_stream, router_consumer_config(names, cfg))
    workers_kv = await _ensure_bucket(js, names.workers_bucket, cfg.worker_ttl)
    load_kv = await _ensure_bucket(js, names.load_bucket, cfg.worker_ttl)
    return workers_kv, load_kv


ROUTER_MAX_DELIVER = 5
# Seconds before a request a worker took from its work queue and never acked is delivered
# again: the worker's queue consumer's ack wait, and how long a router waits for a gone
# worker to come back before it sends that worker's queue elsewhere.
WORK_ACK_WAIT = 30.0


def router_consumer_config(names: Names, cfg: Config) -> js_api.ConsumerConfig:
    return js_api.ConsumerConfig(
        durable_name=names.router_consumer, ack_policy=js_api.AckPolicy.EXPLICIT,
        deliver_policy=js_api.DeliverPolicy.NEW, ack_wait=cfg.router_ack_wait,
        max_deliver=ROUTER_MAX_DELIVER, max_ack_pending=cfg.router_max_inflight * 4,
        max_waiting=512,
    )


async def ensure_consumer(js: JetStreamContext, stream: str,
                          cfg: js_api.ConsumerConfig) -> None:
    assert cfg.durable_name is not None
    try:
        info = await js.consumer_info(stream, cfg.durable_name)
    except NotFoundError:
        await js.add_consumer(stream, cfg)
        return
    # deliver_policy cannot change on an existing consumer; the rest may.
    have = info.config
    if (have.ack_wait, have.max_ack_pending, have.filter_subject) != (
            cfg.ack_wait, cfg.max_ack_pending, cfg.filter_subject):
        cfg.deliver_policy = have.deliver_policy
        await js.add_consumer(stream, cfg)


async def open_bus(cfg: Config, url: str, *, name: str, ensure: bool = True) -> Bus:
    """Connect; with ``ensure`` create or update the topology, else only find it."""
    names = Names(cfg.namespace)
    listeners: list[Callable[[], None]] = []
    nc = await connect(url, name=name, on_reconnect=listeners)
    js = nc.jetstream(timeout=10)
    try:
        residency = None
        if ensure:
            workers_kv, load_kv = await ensure_topology(js, names, cfg)
            residency = await ensure_residency(js, names)
        else:
            workers_kv, load_kv = await find_buckets(js, names)
    except BaseException:
        await nc.close()
        raise
    return Bus(nc=nc, js=js, names=names, workers_kv=workers_kv, load_kv=load_kv,
               residency=residency, on_reconnect=listeners)
