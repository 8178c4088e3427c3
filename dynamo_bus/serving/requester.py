"""The submitting side of the bus, shared by the HTTP frontend and the NATS client.

One subscription per process (``dyn.<ns>.resp.<client_id>.>``) carries the token
streams of every request it submitted; they are demultiplexed here by request id.
A request's stream ends with a chunk carrying ``finish_reason``, or an error. It also
ends with a 503 when the worker running it leaves the registry, so a dead worker
never leaves a client waiting for the full timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from dynamo_bus.bus.connection import Bus
from dynamo_bus.bus.messages import (
    CANCEL,
    REQUEST,
    RESPONSE,
    Cancel,
    Chunk,
    Error,
    Request,
    Response,
    now_ns,
)
from dynamo_bus.bus.registry import Registry
from dynamo_bus.errors import (
    DynamoBusError,
    NoWorker,
    Overloaded,
    PromptTooLong,
    ProtocolError,
    RequestTimeout,
    from_status,
)

log = logging.getLogger(__name__)


class TokenStream:
    """The chunks of one request, in order, without duplicates."""

    def __init__(self, requester: Requester, request: Request, timeout: float) -> None:
        self.request = request
        self.worker_id = ""
        self.finished = False
        self._requester = requester
        # A deque and an event rather than an asyncio.Queue: the reader takes
        # everything waiting at once (see ``_take``).
        self._pending: deque[Response] = deque()
        self._ready = asyncio.Event()
        self._next_index = 0
        self._deadline = asyncio.get_running_loop().time() + timeout
        self._timer: asyncio.TimerHandle | None = None
        self._timed_out = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def _push(self, resp: Response) -> None:
        self._pending.append(resp)
        self._ready.set()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Chunk]:
        try:
            while not self.finished:
                await self._wait()
                resp = self._take()
                if isinstance(resp, Error):
                    self.finished = True
                    raise from_status(resp.status, resp.message, code=resp.code,
                                      param=resp.param)
                if resp.worker_id:
                    self.worker_id = resp.worker_id
                # Drop what was already seen (a redelivered request starts over at 0).
                skip = self._next_index - resp.index
                if skip > 0:
                    if skip >= len(resp.token_ids) and resp.finish_reason is None:
                        continue
                    resp.token_ids = resp.token_ids[skip:]
                    if resp.logprobs is not None:
                        resp.logprobs = resp.logprobs[skip:]
                    if resp.top_logprobs is not None:
                        resp.top_logprobs = resp.top_logprobs[skip:]
                    resp.index = self._next_index
                self._next_index = resp.index + len(resp.token_ids)
                if resp.finish_reason is not None:
                    self.finished = True
                yield resp
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._requester._forget(self.request_id)

    async def _wait(self) -> None:
        """Until something is pending, or the request's deadline (one timer for the
        whole request, armed on first use; it guards only this wait, never the
        caller's code between chunks)."""
        if self._pending:
            return
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(self._deadline, self._expire)
        while not self._pending and not self._timed_out:
            self._ready.clear()
            await self._ready.wait()
        if not self._pending:
            await self.cancel("timed out")
            raise RequestTimeout("request timed out")

    def _expire(self) -> None:
        self._timed_out = True
        self._ready.set()

    def _take(self) -> Response:
        """The next response, with the chunks already waiting behind it folded in: a
        reader that falls behind gets fewer, larger chunks instead of a backlog, and
        pays the per-chunk costs (detokenizing, JSON, a socket write) once."""
        resp = self._pending.popleft()
        if not isinstance(resp, Chunk) or not self._requester.fold_chunks:
            return resp
        while self._pending and resp.finish_reason is None:
            nxt = self._pending[0]
            if not isinstance(nxt, Chunk) or nxt.index != resp.index + len(resp.token_ids):
                break
            self._pending.popleft()
            resp.token_ids = resp.token_ids + nxt.token_ids
            resp.finish_reason, resp.usage = nxt.finish_reason, nxt.usage
            resp.worker_id = resp.worker_id or nxt.worker_id
            # Per-token lists follow their tokens (a chunk without tokens has none).
            if nxt.logprobs is not None:
                resp.logprobs = (resp.logprobs or []) + nxt.logprobs
            if nxt.top_logprobs is not None:
                resp.top_logprobs = (resp.top_logprobs or []) + nxt.top_logprobs
        return resp

    async def cancel(self, reason: str = "client disconnected") -> None:
        """Stop the request wherever it is. Safe to call more than once."""
        if not self.finished:
            self.finished = True
            await self._requester.cancel(self.request_id, reason)


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

    async def start(self) -> None:
        names = self.bus.names
        self._sub = await self.bus.nc.subscribe(names.response_subjects(self.client_id),
                                                cb=self._on_response)
        self.registry.on_removed.append(self._on_worker_removed)

    async def stop(self) -> None:
        for stream in list(self._streams.values()):
            stream._push(Error(request_id=stream.request_id, status=503,
                               message="frontend is shutting down", code="shutdown"))
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

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
        with contextlib.suppress(Exception):
            await self.bus.nc.publish(self.bus.names.cancel_subject,
                                      CANCEL.encode(Cancel(request_id=request_id, reason=reason)))

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def _on_response(self, msg: Msg) -> None:
        try:
            resp = RESPONSE.decode(msg.data)
        except ProtocolError as exc:
            log.warning("dropping response: %s", exc)
            return
        stream = self._streams.get(resp.request_id)
        if stream is not None:
            stream._push(resp)

    def _on_worker_removed(self, worker_id: str) -> None:
        lost = [s for s in self._streams.values()
                if s.worker_id == worker_id and not s.finished]
        for stream in lost:
            stream._push(Error(request_id=stream.request_id, status=503,
                               message=f"worker {worker_id} stopped while generating",
                               code="worker_lost"))
        if lost:  # and no one re-runs them when their messages come back
            task = asyncio.ensure_future(self._cancel_all([s.request_id for s in lost]))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _cancel_all(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            await self.cancel(rid, "worker lost")


def new_request_id() -> str:
    return uuid.uuid4().hex


__all__ = ["DynamoBusError", "Requester", "TokenStream", "new_request_id"]
