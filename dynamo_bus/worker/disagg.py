"""The disaggregated roles of a worker: a prefill worker hands each request's KV to a
decode worker, which claims it, READs the blocks it lacks over NIXL and decodes.

**Prefill** (:class:`PrefillRole`): runs the prompt for one token (chunked, reusing
cached prefix blocks from every tier as any request does), parks the prompt's full
blocks in its host tier under a lease (:class:`~dynamo_bus.worker.kv_share.KVShare`)
and publishes one :class:`~dynamo_bus.bus.messages.KVDescriptor`, holding the request,
on the KV stream: steered to the decode worker the router named (``Request.decode_to``),
or shared by all. It sends the requester nothing but errors: until a decode worker
names itself on the token stream, a prefill worker that dies takes nothing with it (its
work queue goes back to the routers and the request is prefilled again).

**Decode** (:class:`DecodeRole`): pulls descriptors from its own shard and from the
shared one. For each: checks it (see :data:`FAULTS`), READs the blocks it holds in no
tier in one transfer, names itself on the token stream, acks the descriptor (a claimer
that dies before this leaves it to another), and decodes; the engine onboards the
prefix from the host tier and computes only the prompt's last partial block. A
descriptor that fails a check, or whose READ fails or times out, is not lost: the decode
worker prefills the prompt itself, counts the cause (``Load.disagg["fault.<cause>"]``)
and logs it. A descriptor delivered a second time is never READ: its lease may have
ended with the first claimer's READ and its host slots been reused since.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

import msgspec
from nats.aio.msg import Msg
from nats.js import api as js_api

from dynamo_bus.bus.connection import WORK_ACK_WAIT, ensure_agents_bucket, ensure_consumer
from dynamo_bus.bus.consumer import PullConsumer
from dynamo_bus.bus.handback import deliveries, unsteer
from dynamo_bus.bus.messages import (
    KV_DESCRIPTOR,
    REGISTRATION,
    TIERS,
    Chunk,
    KVDescriptor,
    Request,
    unpack_hashes,
)
from dynamo_bus.engines.base import EngineRequest
from dynamo_bus.errors import ConfigError, DynamoBusError, ProtocolError
from dynamo_bus.hashing import sequence_hashes
from dynamo_bus.kvbm.nixl import NixlError
from dynamo_bus.transfer import AgentDirectory
from dynamo_bus.worker.kv_share import KVShare

if TYPE_CHECKING:
    from dynamo_bus.worker.runtime import Worker

log = logging.getLogger(__name__)

NO_PREFIX = "0" * 16  # the prefix token of a prompt shorter than one block
_HOST = bytes([TIERS.index("host")])

# Why a decode worker prefilled a claimed request itself instead of reading its KV.
FAULTS = {
    "bad_descriptor": "the descriptor is malformed or of a newer schema version",
    "redelivered": "the descriptor was delivered before (its lease may have ended)",
    "foreign_kv": "the KV is of another model, block shape or dtype",
    "block_mismatch": "the descriptor's blocks are not the prompt's",
    "lease_expired": "the lease on the blocks ran out before the claim",
    "unknown_agent": "the prefill worker's NIXL agent is not published (it stopped)",
    "transfer_failed": "the NIXL READ failed",
    "transfer_timeout": "the NIXL READ did not finish within --kv-transfer-timeout",
}


def prefix_token(hashes: list[int]) -> str:
    """The subject token naming a prompt's prefix: its first block's hash."""
    return f"{hashes[0]:016x}" if hashes else NO_PREFIX


class _Carrier(msgspec.Struct):
    """The request inside a descriptor this build cannot read whole."""

    request: Request | None = None


async def open_roles(worker: Worker) -> tuple[KVShare, PrefillRole | None,
                                               DecodeRole | None]:
    """Open the worker's NIXL agent, publish it, and make its role (prefill or decode);
    the decode role's consumers start with ``DecodeRole.start``."""
    if not hasattr(worker.engine, "open_transfers"):
        raise ConfigError(f"the {worker.engine.name} engine cannot hand KV between workers; "
                          f"--role {worker.role} needs the reference or the mock engine")
    if getattr(worker.engine, "host", None) is None:
        raise ConfigError(f"--role {worker.role} hands KV between workers through the host "
                          "tier: give it one (--kvbm-host-gib > 0)")
    bus = worker.bus
    directory = AgentDirectory(await ensure_agents_bucket(bus.js, bus.names))
    share = KVShare(worker.engine, directory, worker_id=worker.worker_id,  # type: ignore[arg-type]
                    incarnation=worker.incarnation, lease_s=worker.cfg.kv_lease_s)
    await share.start()
    if worker.role == "prefill":
        return share, PrefillRole(worker, share), None
    return share, None, DecodeRole(worker, share)


class PrefillRole:
    """See the module docstring."""

    def __init__(self, worker: Worker, share: KVShare) -> None:
        self.worker = worker
        self.share = share
        self.counts: Counter[str] = Counter()

    async def run(self, req: Request) -> None:
        try:
            await self._hand_off(req)
        except Exception as exc:  # answered, never left waiting
            log.exception("handing request %s to a decode worker failed", req.request_id)
            await self.worker._send_error(req, f"prefill handoff failed: {exc!r}", 500,
                                          "handoff_failed")

    async def _hand_off(self, req: Request) -> None:
        w, rid = self.worker, req.request_id
        first = await self._first_token(req)
        if first is None or rid in w._cancelled:
            return
        hashes = sequence_hashes(req.token_ids, w.cfg.block_size)
        desc = await self.share.lend(rid, hashes, first_token=first)
        if desc is None:  # no full block (or none parked): the decode worker computes all
            desc = KVDescriptor(request_id=rid, agent=self.share.agent, hashes=b"",
                                addrs=[], block_bytes=0, kv=self.share.engine.kv_digest,
                                lease="", lease_expires=0.0, first_token=first)
        desc.request, desc.prefill_worker = req, w.worker_id
        desc.tiers = _HOST * len(desc.addrs)
        decode_to = req.decode_to if await self._claimable(req.decode_to) else ""
        subject = w.bus.names.kv_subject(req.model, prefix_token(hashes), decode_to)
        data = KV_DESCRIPTOR.encode(desc)
        for attempt in range(5):  # the server may be restarting: try for a few seconds
            try:
                await w.bus.js.publish(subject, data, headers={"Nats-Msg-Id": f"{rid}:kv"})
                break
            except Exception as exc:
                log.warning("publishing the descriptor of %s failed: %r", rid, exc)
                await asyncio.sleep(0.25 * 2**attempt)
        else:
            self.share.leases.done(desc.lease)
            await w._send_error(req, "the prefilled request could not be handed to a decode "
                                "worker (the NATS server did not take its descriptor)", 503,
                                "handoff_failed")
            return
        self.counts["descriptors"] += 1
        self.counts["lent_blocks"] += len(desc.addrs)
        if hashes and not desc.addrs:  # its host tier had no room (pinned by leases)
            self.counts["unparked"] += 1

    async def _first_token(self, req: Request) -> int | None:
        """Prefill the prompt and sample its first token; None after an error (sent to
        the requester)."""
        w = self.worker
        sampling = msgspec.structs.replace(req.sampling, max_tokens=1)
        gen = w.engine.generate(EngineRequest(request_id=req.request_id,
                                              token_ids=req.token_ids, sampling=sampling))
        first = -1
        try:
            async for out in gen:
                if out.token_ids and first < 0:
                    first = out.token_ids[0]
        except DynamoBusError as exc:
            await w._send_error(req, exc.message, exc.status, exc.code)
            return None
        except Exception as exc:
            log.exception("engine failed prefilling request %s", req.request_id)
            await w._send_error(req, f"engine error: {exc}", 500)
            return None
        finally:
            await gen.aclose()
        return first

    async def _claimable(self, worker_id: str) -> bool:
        """Whether ``worker_id`` is registered and not draining: a descriptor steered to
        a worker that is gone would wait for the routers' sweep."""
        if not worker_id:
            return False
        with contextlib.suppress(Exception):
            entry = await self.worker.bus.workers_kv.get(worker_id)
            if entry is not None and entry.value:
                return not REGISTRATION.decode(entry.value).draining
        return False


class DecodeRole:
    """See the module docstring."""

    def __init__(self, worker: Worker, share: KVShare) -> None:
        self.worker = worker
        self.share = share
        self.counts: Counter[str] = Counter()
        bus, names, cfg = worker.bus, worker.bus.names, worker.cfg
        self._mine = PullConsumer(
            bus.nc, names.kv_stream, names.kv_consumer(worker.worker_id),
            capacity=cfg.max_concurrency, handler=self._claim, on_drain=self._unsteer,
            on_missing=self._ensure_mine, expires=1.0)
        self._shared = PullConsumer(
            bus.nc, names.kv_stream, names.kv_shared_consumer(worker.model),
            capacity=max(1, cfg.max_concurrency // 2), handler=self._claim,
            on_drain=self._leave, on_missing=self._ensure_shared, expires=1.0)

    def _consumer_config(self, durable: str, subject: str) -> js_api.ConsumerConfig:
        return js_api.ConsumerConfig(
            durable_name=durable, filter_subject=subject,
            ack_policy=js_api.AckPolicy.EXPLICIT, ack_wait=WORK_ACK_WAIT,
            max_ack_pending=self.worker.cfg.max_concurrency * 2, inactive_threshold=3600.0)

    async def _ensure_mine(self) -> None:
        w, names = self.worker, self.worker.bus.names
        await ensure_consumer(w.bus.js, names.kv_stream, self._consumer_config(
            names.kv_consumer(w.worker_id), names.kv_claim_filter(w.model, w.worker_id)))

    async def _ensure_shared(self) -> None:
        w, names = self.worker, self.worker.bus.names
        await ensure_consumer(w.bus.js, names.kv_stream, self._consumer_config(
            names.kv_shared_consumer(w.model), names.kv_shared_filter(w.model)))

    async def start(self) -> None:
        await self._ensure_mine()
        await self._ensure_shared()
        for consumer in (self._mine, self._shared):
            self.worker.bus.on_reconnect.append(consumer.on_reconnect)
            await consumer.start()

    def stop_fetching(self) -> None:
        self._mine.stop_fetching()
        self._shared.stop_fetching()

    async def wait_idle(self, timeout: float) -> bool:
        results = await asyncio.gather(self._mine.wait_idle(timeout),
                                       self._shared.wait_idle(timeout))
        return all(results)

    async def close(self) -> None:
        """Move what waits on this worker's shard to the shared one, then stop."""
        await self._mine.drain_remaining()
        for consumer in (self._mine, self._shared):
            await consumer.close(timeout=5.0)

    async def _unsteer(self, msg: Msg) -> None:
        await unsteer(self.worker.bus, msg, self.worker.worker_id)

    async def _leave(self, msg: Msg) -> None:
        with contextlib.suppress(Exception):
            await msg.nak()  # another decode worker claims it now

    # -- claiming ----------------------------------------------------------------
    async def _claim(self, msg: Msg) -> None:
        desc: KVDescriptor | None = None
        try:
            desc = KV_DESCRIPTOR.decode(msg.data)
            req = desc.request
        except ProtocolError as exc:
            log.warning("a KV descriptor this build cannot read: %s", exc)
            try:
                req = msgspec.json.decode(msg.data, type=_Carrier).request
            except msgspec.DecodeError:
                req = None
        if req is None:
            self._fault("bad_descriptor", "no request in it: dropped")
            with contextlib.suppress(Exception):
                await msg.term()
            return
        await self.worker._serve(msg, req, lambda r: self._decode(msg, desc, r))

    async def _decode(self, msg: Msg, desc: KVDescriptor | None, req: Request) -> None:
        w = self.worker
        cause = "bad_descriptor" if desc is None else self._check(msg, desc, req)
        if cause is None and desc is not None and desc.addrs:
            try:
                async with asyncio.timeout(w.cfg.kv_transfer_timeout):
                    await self.share.pull(desc)
                self.counts["imported"] += 1
            except LookupError:
                cause = "unknown_agent"
            except ValueError:
                cause = "lease_expired" if desc.lease_expires <= time.time() else "foreign_kv"
            except NixlError:
                cause = "transfer_failed"
            except TimeoutError:
                cause = "transfer_timeout"
            except Exception:
                log.exception("KV claim on %s: the READ of request %s failed",
                              w.worker_id, req.request_id)
                cause = "transfer_failed"
        self.counts["claimed"] += 1
        if cause is not None:
            self._fault(cause, f"request {req.request_id}: prefilling it here")
        # Named on the token stream before the ack: once acked, a death of this worker
        # shows to the requester as its worker lost, never as a silent wait.
        await w._send(req, Chunk(request_id=req.request_id, index=0, token_ids=[],
                                 worker_id=w.worker_id, incarnation=w.incarnation))
        with contextlib.suppress(Exception):
            await msg.ack()
        await w._generate(req, named=True)

    def _check(self, msg: Msg, desc: KVDescriptor, req: Request) -> str | None:
        if deliveries(msg) > 1:
            return "redelivered"
        if not desc.addrs:
            return None
        if desc.kv != self.share.engine.kv_digest:
            return "foreign_kv"
        try:
            lent = list(unpack_hashes(desc.hashes))
        except ProtocolError:
            return "bad_descriptor"
        prompt = sequence_hashes(req.token_ids, self.worker.cfg.block_size)
        if lent != prompt[:len(lent)] or len(lent) != len(desc.addrs):
            return "block_mismatch"
        if desc.lease_expires <= time.time():
            return "lease_expired"
        return None

    def _fault(self, cause: str, detail: str) -> None:
        self.counts[f"fault.{cause}"] += 1
        log.warning("KV claim on %s: %s (%s)", self.worker.worker_id, FAULTS[cause], detail)
