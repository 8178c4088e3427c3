"""Leases on KV blocks lent to another worker.

A worker that lends blocks out of its host tier (for a decode worker's NIXL READ) pins
them there: they cannot be evicted while the reader may still be reading. The lease
ends when the reader's transfer notification arrives (:class:`~dynamo_bus.bus.messages.
KVReadDone`, sent with the READ itself, so it comes only once the bytes have moved) or
when its time runs out, whichever comes first; either way the blocks are unpinned, once.
A reader that comes after expiry may find the blocks gone or overwritten, so it must
not READ past ``expires`` (it prefills the request itself instead).

Pure bookkeeping: the caller says how to release blocks, passes the notifications its
agent received, and calls :meth:`LeaseBook.expire` on a timer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dynamo_bus.bus.messages import KV_READ_DONE
from dynamo_bus.errors import ProtocolError


@dataclass
class Lease:
    lease_id: str
    hashes: list[int]
    expires: float  # on the book's clock


class LeaseBook:
    """See the module docstring. ``release(hashes)`` unpins lent blocks; ``clock`` is
    monotonic seconds (a test passes its own)."""

    def __init__(self, release: Callable[[list[int]], None], *, ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl <= 0:
            raise ValueError("a lease needs a positive time to live")
        self.ttl = ttl
        self._release = release
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self.completed = 0  # leases ended by the reader's notification
        self.expired = 0    # leases that ran out first

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._leases

    def grant(self, lease_id: str, hashes: list[int]) -> float:
        """Hold ``hashes`` (already pinned by the caller) under ``lease_id``; returns
        how many seconds from now it lasts."""
        if lease_id in self._leases:
            raise ValueError(f"lease {lease_id} is already held")
        self._leases[lease_id] = Lease(lease_id, list(hashes), self._clock() + self.ttl)
        return self.ttl

    def done(self, lease_id: str) -> bool:
        """The reader is done: release the lease's blocks. False if it had already
        ended (expired, or a repeated notification)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        self._release(lease.hashes)
        self.completed += 1
        return True

    def on_notices(self, notices: Iterable[bytes]) -> list[str]:
        """End the leases the readers' notifications name; returns their ids.
        Notifications that are not ours (another sender, a bad payload) are skipped."""
        ended = []
        for raw in notices:
            try:
                lease_id = KV_READ_DONE.decode(raw).lease
            except ProtocolError:
                continue
            if self.done(lease_id):
                ended.append(lease_id)
        return ended

    def expire(self) -> list[str]:
        """Release every lease whose time is up; returns their ids."""
        now = self._clock()
        gone = [lid for lid, lease in self._leases.items() if lease.expires <= now]
        for lid in gone:
            self._release(self._leases.pop(lid).hashes)
        self.expired += len(gone)
        return gone

    def next_expiry(self) -> float | None:
        """Seconds until the next lease runs out (None: no lease held)."""
        if not self._leases:
            return None
        return max(0.0, min(lease.expires for lease in self._leases.values()) - self._clock())

    def close(self) -> None:
        """Release everything (the lender is stopping)."""
        leases, self._leases = self._leases, {}
        for lease in leases.values():
            self._release(lease.hashes)
