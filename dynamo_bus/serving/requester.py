"""The submitting side of the bus, shared by the HTTP frontend and the NATS client.

One subscription per process (``dyn.<ns>.resp.<client_id>.>``) carries the token
streams of every request it submitted (each request names the batch subject under it
as ``batch_to``, so a worker sends what one engine step produced for all of them as
one message); they are demultiplexed here by request id into
:class:`~dynamo_bus.serving.stream.TokenStream`, which checks every chunk's position.
A request's stream ends with a chunk carrying ``finish_reason``, or an error. It also
ends with a 503 when the worker running it leaves the registry or is restarted (a new
incarnation under its id), so a dead worker never leaves a client waiting for the full
timeout. Chunks for a request nobody here waits for any more are answered with a cancel,
so a worker that lost track (frozen past its TTL, or a redelivery to a new run) stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Coroutine
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from dynamo_bus.bus.connection import Bus
from dynamo_bus.bus.messages import (
    CANCEL,
    REQUEST,
    RESEND,
    RESEND_ACK,
    RESPONSE,
    Cancel,
    ChunkBatch,
    Error,
    Request,
    Resend,
    ResendAck,
    Response,
    now_ns,
    unbatch,
)
from dynamo_bus.bus.recent import RecentIds
from dynamo_bus.bus.registry import Registry
from dynamo_bus.errors import DynamoBusError, NoWorker, Overloaded, PromptTooLong, ProtocolError
from dynamo_bus.serving.stream import TokenStream

log = logging.getLogger(__name__)


class Requester:
    def __init__(self, bus: Bus, registry: Registry, *, max_inflight: int = 4096,
                 timeout: float = 600.0, fold_chunks: bool = True) -> None:
        self.bus = bus
        self.registry = registry
        self.client_id = uuid.uuid4().hex[:12]
        self.max_inflight = max_inflight
        self.timeout = timeout
        self.fold_chunks = fold_chunks
        self._streams: dict[str, TokenStream] = {}
        self._sub: Subscription | None = None
        self._background: set[asyncio.Future[None]] = set()
        self._told_to_stop = RecentIds()  # requests already answered with a cancel
        self.gaps_repaired = 0  # token streams whose lost chunks were sent again
        self.gaps_failed = 0    # token streams that ended with an error for a gap

    async def start(self) -> None:
        names = self.bus.names
        self._sub = await self.bus.nc.subscribe(names.response_subjects(self.client_id),
                                                cb=self._on_response)
        self.registry.on_removed.append(self._on_worker_removed)
        self.bus.on_reconnect.append(self._on_reconnect)

    async def stop(self) -> None:
        for stream in list(self._streams.values()):
            stream._push(Error(request_id=stream.request_id, status=503,
                               message="frontend is shutting down", code="shutdown"))
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=5.0)

    @property
    def inflight(self) -> int:
        return len(self._streams)

    async def submit(self, request: Request, *, timeout: float | None = None) -> TokenStream:
        """Publish ``request`` to the request log and return its token stream.

        ``request.reply_to`` and ``created_ns`` are filled in here. Raises ``NoWorker``
        when no live worker serves the model and ``Overloaded`` past ``max_inflight``.
        """
        if len(self._streams) >= self.max_inflight:
            raise Overloaded(f"more than {self.max_inflight} requests in flight; retry later",
                             status=429, code="too_many_requests")
        if not self.registry.workers(request.model):
            raise NoWorker(f"no live worker serves model {request.model!r}")
        names = self.bus.names
        request.reply_to = names.response_subject(self.client_id, request.request_id)
        request.batch_to = names.response_batch_subject(self.client_id)
        request.created_ns = request.created_ns or now_ns()
        stream = TokenStream(self, request, timeout or self.timeout)
        self._streams[request.request_id] = stream
        data = REQUEST.encode(request)
        limit = self.bus.nc.max_payload
        if len(data) > limit - 1024:  # headers and subject travel in the same message
            del self._streams[request.request_id]
            raise PromptTooLong(
                f"the request is {len(data) / 2**20:.2f} MiB on the wire ({len(request.token_ids)} "
                f"prompt tokens); the NATS server takes messages up to {limit / 2**20:.2f} MiB "
                "(its max_payload setting)", param="prompt", code="request_too_large")
        try:
            await self.bus.js.publish(names.request_subject(request.model), data,
                                      headers={"Nats-Msg-Id": request.request_id})
        except BaseException as exc:
            # Not stored, or we stopped waiting (the caller was cancelled): it may be
            # stored all the same, so cancel it rather than leave it running for no one.
            await self.cancel(request.request_id, "submit abandoned")
            if isinstance(exc, Exception):
                raise Overloaded(f"could not store the request: {exc}") from exc
            raise
        return stream

    async def cancel(self, request_id: str, reason: str) -> None:
        self._forget(request_id)
        self._told_to_stop.add(request_id)
        with contextlib.suppress(Exception):
            await self.bus.nc.publish(self.bus.names.cancel_subject,
                                      CANCEL.encode(Cancel(request_id=request_id, reason=reason)))

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def _on_response(self, msg: Msg) -> None:
        try:
            delivery = RESPONSE.decode(msg.data)
        except ProtocolError as exc:
            log.warning("dropping response: %s", exc)
            return
        responses = unbatch(delivery)
        if isinstance(delivery, ChunkBatch) and len(responses) < len(delivery.items):
            log.warning("dropping %d chunks of a batch: a newer schema version than this "
                        "build reads", len(delivery.items) - len(responses))
        for resp in responses:
            await self._deliver(resp)

    async def _deliver(self, resp: Response) -> None:
        stream = self._streams.get(resp.request_id)
        if stream is not None:
            stream._push(resp)
        elif not isinstance(resp, Error) and resp.request_id not in self._told_to_stop:
            # Nobody waits for it (failed, cancelled, or finished and this is a copy):
            # whoever still generates it should stop.
            await self.cancel(resp.request_id, "nobody is waiting for this request")

    async def ask_resend(self, request_id: str, from_index: int) -> ResendAck | None:
        """Ask the worker that ran ``request_id`` to send its chunks from ``from_index``
        on again; its answer, or None when no worker holds them (or none answered)."""
        try:
            reply = await self.bus.nc.request(
                self.bus.names.resend_subject,
                RESEND.encode(Resend(request_id=request_id, from_index=from_index)),
                timeout=1.0)
            return RESEND_ACK.decode(reply.data)
        except (NoRespondersError, NatsTimeout, TimeoutError, ProtocolError):
            return None
        except Exception as exc:  # the connection is down again: ask later
            log.debug("resend of %s not asked: %r", request_id, exc)
            return None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a task this requester owns (and cancels on stop)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _on_reconnect(self) -> None:
        # Chunks sent while our subscription was not on the server are gone; a stream
        # whose end went with them sees no gap, so every stream asks.
        for stream in list(self._streams.values()):
            stream.repair(gap=False)

    def _on_worker_removed(self, worker_id: str, incarnation: str) -> None:
        lost = [s for s in self._streams.values()
                if s.worker_id == worker_id and not s.finished
                and (not incarnation or not s.incarnation or s.incarnation == incarnation)]
        why = (f"worker {worker_id} was restarted (a new process took its id) while "
               "generating; the answer it had begun is lost"
               if self.registry.get(worker_id) is not None
               else f"worker {worker_id} stopped while generating")
        for stream in lost:
            stream._push(Error(request_id=stream.request_id, status=503, message=why,
                               code="worker_lost"))
        if lost:  # and no one re-runs them when their messages come back
            self.spawn(self._cancel_all([s.request_id for s in lost]))

    async def _cancel_all(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            await self.cancel(rid, "worker lost")


def new_request_id() -> str:
    return uuid.uuid4().hex


__all__ = ["DynamoBusError", "Requester", "new_request_id"]
