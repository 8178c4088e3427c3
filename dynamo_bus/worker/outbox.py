"""Token-stream messages that leave together.

An engine step wakes every request it produced a token for; each request's task then
hands its chunk to the outbox, which sends once they all have (it runs after the
tasks the step woke, in the same pass of the event loop, so nothing waits for a
timer). Chunks for the same subject (``Request.batch_to``: every request of one
frontend) go as one ``ChunkBatch`` message, spliced from their encoded bytes: one
publish, one message for nats-server to route and one for the frontend to parse, where
there were as many as the step had requests. Order per subject is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from dynamo_bus.bus.messages import join_responses

MAX_BATCH_BYTES = 256 << 10  # well under the server's 1 MiB payload limit


class Publisher(Protocol):
    """What the outbox needs of a NATS connection (``nats.aio.client.Client`` is one)."""

    @property
    def max_payload(self) -> int: ...

    async def publish(self, subject: str, payload: bytes) -> None: ...


class Outbox:
    """Shared by the workers of one process (they share a connection too): a pass of
    the event loop in which several engines stepped sends one batch per frontend."""

    def __init__(self, nc: Publisher) -> None:
        self._nc = nc
        self._pending: dict[str, list[bytes]] = {}
        self._sending = asyncio.Lock()  # a publish can wait: later items wait behind it
        self._flushes: set[asyncio.Task[None]] = set()

    def put(self, subject: str, data: bytes) -> None:
        """Send ``data`` (an encoded ``Chunk`` or ``Error``) on ``subject``, a
        ``batch_to`` subject, with whatever else is put there in this pass."""
        if not self._pending:
            # Runs after the callbacks already queued: the other tasks this step woke.
            asyncio.get_running_loop().call_soon(self._schedule_flush)
        self._pending.setdefault(subject, []).append(data)

    def _schedule_flush(self) -> None:
        task = asyncio.ensure_future(self.flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def flush(self) -> None:
        """Send everything put so far now."""
        async with self._sending:
            pending, self._pending = self._pending, {}
            limit = min(MAX_BATCH_BYTES, self._nc.max_payload - 4096)
            try:
                while pending:
                    subject, items = next(iter(pending.items()))
                    for payload in _payloads(items, limit):
                        # Failed (connection down): requesters ask for what they miss again.
                        with contextlib.suppress(Exception):
                            await self._nc.publish(subject, payload)
                    del pending[subject]
            finally:
                # Cancelled midway (the caller's task was): what is left goes soon, ahead
                # of anything put since (a subject cut off midway may go twice: readers
                # drop what they already have).
                if pending:
                    for subject, items in pending.items():
                        self._pending.setdefault(subject, [])[:0] = items
                    asyncio.get_running_loop().call_soon(self._schedule_flush)

    async def close(self) -> None:
        """Send what is waiting (and wait for sends under way)."""
        await self.flush()
        if self._flushes:
            await asyncio.wait(list(self._flushes))


def _payloads(items: list[bytes], limit: int = MAX_BATCH_BYTES) -> list[bytes]:
    """``items`` as messages of at most ``limit`` bytes (unless one item alone is
    larger): a lone item as it is, several spliced into a ``ChunkBatch``."""
    groups: list[list[bytes]] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + len(item) > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += len(item) + 1
    return [group[0] if len(group) == 1 else join_responses(group) for group in groups]
