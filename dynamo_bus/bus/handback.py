"""Giving a request back to the routers: used by a draining worker for requests it
never started, and by routers for the queue of a worker that vanished."""

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
