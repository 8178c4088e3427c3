"""Giving a request back: to the routers (a request from a work queue), or to every
decode worker (a KV descriptor steered to one). Used by a draining worker for what it
never started, and by routers for the queues of a worker that vanished."""

from __future__ import annotations

import logging

from nats.aio.msg import Msg

from dynamo_bus.bus.connection import Bus, decode_request
from dynamo_bus.bus.messages import REQUEST

log = logging.getLogger(__name__)


async def hand_back(bus: Bus, msg: Msg, worker_id: str) -> None:
    """Republish the request in ``msg`` (from ``worker_id``'s work queue) to the request
    log with that worker excluded, then ack it. The de-duplication id names the work
    queue message, so two routers sweeping the same queue publish it once."""
    req = await decode_request(msg)
    if req is None:
        return
    if worker_id not in req.routing.exclude_workers:
        req.routing.exclude_workers.append(worker_id)
    if req.routing.worker_id == worker_id:
        req.routing.worker_id = None
    seq = msg.metadata.sequence.stream
    await bus.js.publish(bus.names.request_subject(req.model), REQUEST.encode(req),
                         headers={"Nats-Msg-Id": f"{req.request_id}:handback:{worker_id}:{seq}"})
    await msg.ack()
    log.info("handed back request %s from worker %s", req.request_id, worker_id)


DELIVERED = "Dyn-Delivered"  # header: times a descriptor reached a claimer before a move


def deliveries(msg: Msg) -> int:
    """Times this descriptor has reached a claimer, this delivery included, across
    moves from one subject to another."""
    before = int((msg.headers or {}).get(DELIVERED, 0) or 0)
    return before + msg.metadata.num_delivered


async def unsteer(bus: Bus, msg: Msg, worker_id: str) -> None:
    """Move a KV descriptor steered to ``worker_id`` (draining, or gone) to the shared
    subject of its model, where any decode worker claims it, then ack it. This
    delivery is not a claim: it does not count in :func:`deliveries`."""
    subject = bus.names.kv_unsteered(msg.subject)
    seq = msg.metadata.sequence.stream
    await bus.js.publish(subject, msg.data, headers={
        "Nats-Msg-Id": f"kvmove:{worker_id}:{seq}", DELIVERED: str(deliveries(msg) - 1)})
    await msg.ack()
    log.info("moved a KV descriptor from decode worker %s to any decode worker", worker_id)
