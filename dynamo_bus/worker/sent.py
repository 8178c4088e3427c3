"""What a worker sent on each request's token stream, kept so it can be sent again.

Token streams are core NATS: chunks that reach a server while the requester's
subscription is not on it (a nats-server restart) are dropped. A requester that sees a
gap, or whose connection came back, asks for the chunks from a position on
(``Resend``), and the worker sends them again byte for byte; the requester drops what it
already has. The log holds a request's encoded chunks (and its final error) while it
runs and for ``keep_s`` after it ends, the finished ones bounded by ``max_bytes``: a
1,000-token stream is ~100 KB.

A request's chunks sit in one ``bytearray`` with their positions in an ``array``: no
Python object per chunk, so thousands of kept streams add nothing for the garbage
collector to walk.
"""

from __future__ import annotations

import contextlib
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from dynamo_bus.bus.messages import RESEND, RESEND_ACK, ResendAck
from dynamo_bus.errors import ProtocolError

_FINAL = 1 << 62  # the end position of a request's error: always sent again


@dataclass
class _Sent:
    reply_to: str
    data: bytearray = field(default_factory=bytearray)
    # Per chunk: first output position, end position, end offset in ``data``.
    bounds: array[int] = field(default_factory=lambda: array("q"))
    finished_at: float = 0.0


class SentLog:
    """Encoded chunks per request id, for ``Resend``."""

    def __init__(self, *, keep_s: float = 30.0, max_bytes: int = 64 << 20) -> None:
        self.keep_s = keep_s
        self.max_bytes = max_bytes
        self._running: dict[str, _Sent] = {}
        self._finished: OrderedDict[str, _Sent] = OrderedDict()
        self._finished_bytes = 0

    def open(self, request_id: str, reply_to: str) -> None:
        self._running[request_id] = _Sent(reply_to)

    def add(self, request_id: str, index: int, n_tokens: int, data: bytes) -> None:
        """A chunk of ``n_tokens`` tokens from output position ``index`` (an error:
        ``n_tokens`` < 0)."""
        sent = self._running.get(request_id)
        if sent is not None:
            sent.data += data
            sent.bounds.extend((index, _FINAL if n_tokens < 0 else index + n_tokens,
                                len(sent.data)))

    def close(self, request_id: str) -> None:
        """The request ended here; keep its chunks ``keep_s`` more."""
        sent = self._running.pop(request_id, None)
        if sent is None:
            return
        sent.finished_at = time.monotonic()
        self._finished[request_id] = sent
        self._finished_bytes += len(sent.data)
        self._evict()

    def _evict(self) -> None:
        cutoff = time.monotonic() - self.keep_s
        while self._finished:
            rid, oldest = next(iter(self._finished.items()))
            if oldest.finished_at > cutoff and self._finished_bytes <= self.max_bytes:
                return
            del self._finished[rid]
            self._finished_bytes -= len(oldest.data)

    def since(self, request_id: str, from_index: int) -> tuple[str, list[bytes], bool] | None:
        """(reply subject, the chunks reaching past ``from_index`` in the order they were
        sent, whether the request has ended), or None when this log does not hold it."""
        self._evict()
        sent = self._running.get(request_id)
        finished = sent is None
        if sent is None:
            sent = self._finished.get(request_id)
            if sent is None:
                return None
        chunks, offset, b = [], 0, sent.bounds
        for i in range(0, len(b), 3):
            index, end, stop = b[i], b[i + 1], b[i + 2]
            if end > from_index or index >= from_index:
                chunks.append(bytes(sent.data[offset:stop]))
            offset = stop
        return sent.reply_to, chunks, finished

    async def answer(self, msg: Msg, nc: NATS, worker_id: str, incarnation: str) -> None:
        """A requester lost chunks in transit (``msg``: its ``Resend``): send them again,
        then answer. A worker that does not hold the request stays silent."""
        try:
            ask = RESEND.decode(msg.data)
        except ProtocolError:
            return
        found = self.since(ask.request_id, ask.from_index)
        if found is None:
            return
        reply_to, chunks, finished = found
        with contextlib.suppress(Exception):
            for data in chunks:
                await nc.publish(reply_to, data)
            await msg.respond(RESEND_ACK.encode(ResendAck(
                request_id=ask.request_id, worker_id=worker_id, incarnation=incarnation,
                chunks=len(chunks), finished=finished)))
