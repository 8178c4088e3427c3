"""Leases on lent KV blocks: each ends once, by the reader's notification or by its
time running out, and releases its blocks then."""

from __future__ import annotations

import pytest

from dynamo_bus.bus.messages import KV_READ_DONE, KVReadDone
from dynamo_bus.transfer import LeaseBook


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def book(ttl: float = 5.0) -> tuple[LeaseBook, list[list[int]], Clock]:
    released: list[list[int]] = []
    clock = Clock()
    return LeaseBook(released.append, ttl=ttl, clock=clock), released, clock


def test_the_readers_notification_ends_a_lease_once() -> None:
    leases, released, _ = book()
    leases.grant("r1.1", [1, 2, 3])
    leases.grant("r2.1", [4])
    done = KV_READ_DONE.encode(KVReadDone(lease="r1.1"))
    assert leases.on_notices([done, b"not ours", done]) == ["r1.1"]
    assert released == [[1, 2, 3]] and "r1.1" not in leases and len(leases) == 1
    assert leases.completed == 1 and leases.expired == 0
    with pytest.raises(ValueError, match="already held"):
        leases.grant("r2.1", [5])


def test_a_lease_nobody_reads_runs_out_and_frees_its_blocks() -> None:
    leases, released, clock = book(ttl=5.0)
    leases.grant("a", [1])
    clock.now += 2
    leases.grant("b", [2])
    assert leases.next_expiry() == pytest.approx(3.0)
    clock.now += 2.9
    assert leases.expire() == [] and released == []
    clock.now += 0.1
    assert leases.expire() == ["a"] and released == [[1]]
    # The reader's notification after expiry ends nothing: the blocks went already.
    assert not leases.done("a") and released == [[1]]
    clock.now += 10
    assert leases.expire() == ["b"] and leases.next_expiry() is None
    assert leases.expired == 2 and leases.completed == 0


def test_closing_the_book_releases_every_lease() -> None:
    leases, released, _ = book()
    leases.grant("a", [1])
    leases.grant("b", [2, 3])
    leases.close()
    assert sorted(released) == [[1], [2, 3]] and len(leases) == 0
    with pytest.raises(ValueError, match="positive"):
        LeaseBook(print, ttl=0)
