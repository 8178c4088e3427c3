"""Eviction policies: which block a tier gives up."""

from __future__ import annotations

import random

import pytest

from dynamo_bus.kvbm.policy import LFU, LRU, make_policy


def test_lru_evicts_the_block_used_longest_ago() -> None:
    p = LRU()
    for h in (1, 2, 3):
        p.insert(h)
    p.touch(1)
    assert p.victim() == 2
    assert p.victim(keep={2}) == 3
    p.remove(2)
    assert (p.victim(), len(p), 2 in p) == (3, 2, False)
    assert p.victim(keep={1, 3}) is None


def test_lfu_evicts_the_least_read_block_the_oldest_among_equals() -> None:
    p = LFU(aging=1000)
    for h in (1, 2, 3):
        p.insert(h)
    for _ in range(3):
        p.touch(1)
    p.touch(3)
    assert p.victim() == 2          # stored and never read since
    p.touch(2)                      # 2 and 3 now even: 3 was used longer ago
    assert p.victim() == 3
    p.remove(3)
    assert p.victim() == 2
    assert p.victim(keep={2}) == 1


def _eviction_order(p: LFU) -> list[int]:
    order = []
    while (v := p.victim()) is not None:
        order.append(v)
        p.remove(v)
    return order


def test_lfu_aging_lets_a_once_popular_block_go() -> None:
    def run(aging: int) -> list[int]:
        p = LFU(aging=aging)
        p.insert(1)
        for _ in range(50):
            p.touch(1)              # popular once
        for h in range(100, 110):   # then newer blocks, each read a few times
            p.insert(h)
            for _ in range(3):
                p.touch(h)
        return _eviction_order(p)

    assert run(10_000)[-1] == 1     # no aging to speak of: old popularity keeps it
    assert run(2)[-1] != 1          # with aging it goes before blocks read lately


@pytest.mark.parametrize("name", ["lru", "lfu"])
def test_a_policy_tracks_exactly_what_the_tier_holds(name: str) -> None:
    rng = random.Random(3)
    p = make_policy(name)
    held: set[int] = set()
    for _ in range(5000):
        op = rng.random()
        h = rng.randrange(200)
        if op < 0.4:
            if h not in held:
                p.insert(h)
                held.add(h)
        elif op < 0.7:
            p.touch(h)  # touching what is not held is ignored
        elif op < 0.85:
            p.remove(h)
            held.discard(h)
        else:
            keep = set(rng.sample(range(200), 50))
            v = p.victim(keep)
            assert (v is None) == (not held - keep)
            if v is not None:
                assert v in held and v not in keep
        assert len(p) == len(held) and all(x in p for x in held)


def test_unknown_policy_is_named() -> None:
    with pytest.raises(ValueError, match="lru, lfu"):
        make_policy("fifo")
