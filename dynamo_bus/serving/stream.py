"""One request's token stream on the submitting side: whole, in order, or an error.

Chunks travel over core NATS, which drops what reaches a server while the requester's
subscription is not there (a nats-server restart). Every chunk says where its tokens
start (``Chunk.index``), so a stream checks each one as it arrives:

* a chunk at or before the next expected position joins the stream (what was already
  seen is dropped later, by the reader);
* a chunk past it opens a gap: it waits aside, and the stream asks the worker to send
  the chunks from the gap on again (``Resend``; the worker keeps what it sent). Once
  they arrive the chunks waiting aside follow them. A gap nobody can fill within
  ``REPAIR_WINDOW`` ends the stream with a 503 naming the cause, never a short answer;
* a chunk from another run (``incarnation``) of the worker than the one whose tokens
  the stream already holds ends it with a 503: two runs' tokens are never joined;
* after the connection comes back, the stream asks for everything past what it holds,
  in case the end of the answer was lost with nothing after it to show a gap.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from dynamo_bus.bus.messages import Chunk, Error, Request, Response
from dynamo_bus.errors import RequestTimeout, from_status

if TYPE_CHECKING:
    from dynamo_bus.serving.requester import Requester

log = logging.getLogger(__name__)

REPAIR_WINDOW = 10.0  # seconds a gap may stay open while the worker is asked again
_ASK_EVERY = 1.0      # seconds between asks (each waits this long for an answer)
_RECONNECT_ASKS = 3   # asks after a reconnect with no gap seen (no answer: nothing lost)


class TokenStream:
    """The chunks of one request, in order, without gaps or duplicates."""

    def __init__(self, requester: Requester, request: Request, timeout: float) -> None:
        self.request = request
        self.worker_id = ""
        self.incarnation = ""
        self.finished = False
        self._requester = requester
        # A deque and an event rather than an asyncio.Queue: the reader takes
        # everything waiting at once (see ``_take``).
        self._pending: deque[Response] = deque()
        self._ready = asyncio.Event()
        self._next_index = 0   # next output position the reader has not had
        self._received = 0     # output positions received without a gap
        self._ahead: dict[int, Chunk] = {}  # chunks past a gap, by index
        self._repair: asyncio.Task[None] | None = None
        self._gap = False      # chunks wait in ``_ahead`` for ones that did not come
        self._closed = False   # an error was queued: nothing more is taken in
        self._deadline = asyncio.get_running_loop().time() + timeout
        self._timer: asyncio.TimerHandle | None = None
        self._timed_out = False
        # Called before the reader waits for a chunk that is not there yet: a reader
        # holding output back (events ready together, written at once) flushes it.
        self.before_wait: Callable[[], Awaitable[None]] | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    # -- receiving -----------------------------------------------------------------
    def _push(self, resp: Response) -> None:
        """Take in what arrived for this request (called for every message)."""
        if self._closed:
            return
        if isinstance(resp, Error):
            self._close(resp)
            return
        if resp.incarnation and resp.incarnation != self.incarnation:
            if self._received > 0 or self._ahead:
                self._close(Error(
                    request_id=self.request_id, status=503, code="worker_lost",
                    message=f"worker {resp.worker_id or self.worker_id} restarted while "
                            "generating this request; the answer it had begun is lost"))
                return
            self.worker_id, self.incarnation = resp.worker_id, resp.incarnation
        elif resp.worker_id and not self.worker_id:
            self.worker_id = resp.worker_id
        if resp.index > self._received:
            self._ahead.setdefault(resp.index, resp)
            self.repair(gap=True)
            return
        self._accept(resp)
        while self._ahead:  # what waited behind the gap, now that it may be filled
            index = min(self._ahead)
            if index > self._received:
                return
            self._accept(self._ahead.pop(index))
        if self._gap:
            self._gap = False
            self._requester.gaps_repaired += 1

    def _accept(self, resp: Chunk) -> None:
        self._received = max(self._received, resp.index + len(resp.token_ids))
        self._pending.append(resp)
        self._ready.set()

    def _close(self, err: Error) -> None:
        self._closed = True
        self._pending.append(err)
        self._ready.set()

    # -- repairing -------------------------------------------------------------------
    def repair(self, *, gap: bool) -> None:
        """Ask for the chunks past what this stream holds: after a ``gap``, or after
        the connection came back (when a lost end leaves no gap to see)."""
        if self._closed or self.finished:
            return
        if gap:
            self._gap = True
        if self._repair is None or self._repair.done():
            self._repair = self._requester.spawn(self._repair_loop())

    async def _repair_loop(self) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + REPAIR_WINDOW
        asks, answered = 0, False
        while not self._closed and not self.finished and loop.time() < give_up:
            if not self._gap and (answered or asks >= _RECONNECT_ASKS):
                return  # nothing is missing that we know of
            asks += 1
            ack = await self._requester.ask_resend(self.request_id, self._received)
            answered = answered or ack is not None
            # Re-sent chunks arrive before the answer; a gap still open after a short
            # wait means they were lost again (or the worker is still reconnecting).
            await asyncio.sleep(0.2 if ack is not None else _ASK_EVERY)
        if self._gap and not self._closed and not self.finished:
            self._requester.gaps_failed += 1
            log.warning("request %s: tokens %d+ were lost in transit and no worker could "
                        "send them again", self.request_id, self._received)
            self._close(Error(
                request_id=self.request_id, status=503, code="stream_gap",
                message=f"tokens {self._received}+ of this answer were lost in transit (the "
                        "NATS connection dropped) and could not be sent again; the answer "
                        "would be incomplete"))

    # -- reading ---------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Chunk]:
        try:
            while not self.finished:
                await self._wait()
                chunk = self._next()
                if chunk is not None:
                    yield chunk
        finally:
            if self._timer is not None:
                self._timer.cancel()
            if self._repair is not None:
                self._repair.cancel()
            self._requester._forget(self.request_id)

    def _next(self) -> Chunk | None:
        """The next chunk for the reader, less what it already had; raises on an error."""
        resp = self._take()
        if isinstance(resp, Error):
            self.finished = True
            raise from_status(resp.status, resp.message, code=resp.code, param=resp.param)
        # Drop what was already seen (re-sent chunks, a redelivery starting over at 0).
        skip = self._next_index - resp.index
        if skip > 0:
            if skip >= len(resp.token_ids) and resp.finish_reason is None:
                return None
            resp.token_ids = resp.token_ids[skip:]
            if resp.logprobs is not None:
                resp.logprobs = resp.logprobs[skip:]
            if resp.top_logprobs is not None:
                resp.top_logprobs = resp.top_logprobs[skip:]
            resp.index = self._next_index
        self._next_index = resp.index + len(resp.token_ids)
        if resp.finish_reason is not None:
            self.finished = True
        return resp

    async def _wait(self) -> None:
        """Until something is pending, or the request's deadline (one timer for the
        whole request, armed on first use; it guards only this wait, never the
        caller's code between chunks)."""
        if self._pending:
            return
        if self.before_wait is not None:
            await self.before_wait()
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
