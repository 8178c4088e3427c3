"""The host tier (G2): blocks by hash, eviction, pinning, residency changes, data."""

from __future__ import annotations

import pytest
import torch

from dynamo_bus.kvbm.host import HostTier
from dynamo_bus.kvbm.policy import LFU


def test_put_evicts_least_recent_but_never_the_blocks_being_put() -> None:
    t = HostTier(3)
    assert t.put([1, 2, 3]) == []
    assert t.prefix([1, 2, 3, 4]) == 3
    assert t.put([4]) == [1]
    assert t.prefix([1, 2]) == 0 and t.prefix([2, 3, 4]) == 3
    # A put larger than the tier keeps its first blocks, evicting nothing of its own.
    assert sorted(t.put([5, 6, 7, 8])) == [2, 3, 4]
    assert [h in t for h in (5, 6, 7, 8)] == [True, True, True, False]


def test_pinned_blocks_stay_while_a_copy_out_runs() -> None:
    t = HostTier(2)
    t.put([1, 2])
    slots = t.pin([1])
    assert t.put([3]) == [2]
    assert t.put([4]) == [3]          # 1 is pinned: the newer 3 goes instead
    t.unpin([1])
    assert t.put([5]) == [1]
    assert len(slots) == 1 and t.onboarded == 1


def test_changes_tell_what_came_and_went() -> None:
    t = HostTier(2, policy=LFU())
    t.put([1])
    assert t.drain_changes() == {1: True}   # the first drain: everything held
    t.put([2, 3])
    assert t.drain_changes() == {2: True, 3: True, 1: False}
    assert t.drain_changes() == {}


def test_blocks_come_back_bit_for_bit() -> None:
    shape = (2, 3, 4, 2, 8)
    t = HostTier(4, block_shape=shape, dtype=torch.bfloat16)
    data = torch.randn((3, *shape)).to(torch.bfloat16)
    t.put([10, 11, 12], data)
    t.put([11, 13], torch.zeros((2, *shape), dtype=torch.bfloat16))  # 11 kept as it was
    slots = t.pin([10, 11, 12])
    assert torch.equal(t.data[slots], data)
    assert t.block_bytes == data[0].numel() * 2


def test_a_tier_needs_room() -> None:
    with pytest.raises(ValueError):
        HostTier(0)
