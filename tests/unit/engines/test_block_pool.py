"""The block pool: exact accounting, prefix reuse and LRU eviction of cached blocks."""

from __future__ import annotations

import random

import pytest

from dynamo_bus.engines.block_pool import BlockPool
from dynamo_bus.hashing import sequence_hashes


def prompt(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def computed(pool: BlockPool, rid: str, tokens: list[int]) -> tuple[list[int], int]:
    """Allocate and mark the whole prompt computed, as an engine does after prefill."""
    out = pool.allocate(rid, tokens)
    pool.mark_computed(rid, len(tokens))
    return out


def assert_balanced(pool: BlockPool) -> None:
    assert pool.num_active + pool.num_free == pool.num_blocks
    assert 0 <= pool.num_cached <= pool.num_free


def test_allocate_and_free_return_every_block() -> None:
    pool = BlockPool(num_blocks=10, block_size=4)
    ids, cached = pool.allocate("a", prompt(0, 9))  # 3 blocks, the last partial
    assert len(ids) == len(set(ids)) == 3 and cached == 0
    assert pool.num_active == 3 and pool.num_free == 7
    pool.allocate("b", prompt(100, 4))
    assert pool.num_active == 4
    pool.free("a")
    pool.free("b")
    assert pool.num_active == 0 and pool.num_free == 10
    pool.free("a")  # freeing twice (an abort after finish) changes nothing
    pool.free("never-seen")
    assert pool.num_free == 10
    assert_balanced(pool)


def test_prefix_hit_after_a_finished_request() -> None:
    pool = BlockPool(num_blocks=10, block_size=16)
    tokens = prompt(0, 40)
    first, _ = computed(pool, "a", tokens)
    pool.free("a")
    assert pool.num_cached == 2  # the two full blocks; the partial one is not reusable
    again, cached = pool.allocate("b", [*tokens[:35], 9, 9, 9])
    assert cached == 32
    assert again[:2] == first[:2]
    assert pool.num_cached == 0 and pool.num_active == 3


def test_blocks_are_reusable_only_once_computed() -> None:
    pool = BlockPool(num_blocks=10, block_size=4)
    pool.allocate("a", prompt(0, 12))
    pool.mark_computed("a", 5)  # one full block computed so far
    _, cached = pool.allocate("b", prompt(0, 12))
    assert cached == 4


def test_a_fully_cached_prompt_still_computes_its_last_block() -> None:
    pool = BlockPool(num_blocks=10, block_size=4)
    computed(pool, "a", prompt(0, 8))
    pool.free("a")
    _, cached = pool.allocate("b", prompt(0, 8))
    assert cached == 4  # logits need at least one computed token


def test_running_requests_share_prefix_blocks() -> None:
    pool = BlockPool(num_blocks=10, block_size=4)
    a_ids, _ = computed(pool, "a", prompt(0, 10))
    b_ids, cached = pool.allocate("b", prompt(0, 10))
    assert cached == 8 and b_ids[:2] == a_ids[:2] and b_ids[2] != a_ids[2]
    assert pool.num_active == 4  # two shared, one tail each
    pool.free("a")
    assert pool.num_active == 3  # b still holds the shared prefix
    pool.free("b")
    assert pool.num_active == 0
    assert_balanced(pool)


def test_cached_blocks_are_evicted_lru_and_only_when_needed() -> None:
    pool = BlockPool(num_blocks=6, block_size=4)
    computed(pool, "a", prompt(0, 8))
    pool.free("a")
    computed(pool, "b", prompt(100, 8))
    pool.free("b")
    assert pool.num_cached == 4 and pool.num_free == 6
    _, cached = pool.allocate("a2", prompt(0, 9))  # a hit makes a's prefix the most recent
    assert cached == 8
    pool.free("a2")
    assert pool.num_cached == 4  # nothing was evicted: two empty blocks remained
    pool.allocate("c", prompt(500, 16))  # four blocks: two empty, then the LRU prefix
    assert pool.num_cached == 2
    pool.free("c")  # never computed: its blocks come back empty
    _, a_hit = pool.allocate("a3", prompt(0, 9))
    pool.free("a3")
    _, b_hit = pool.allocate("b2", prompt(100, 9))
    assert (a_hit, b_hit) == (8, 0)


def test_a_prefix_outlives_its_continuation() -> None:
    pool = BlockPool(num_blocks=4, block_size=4)
    computed(pool, "a", prompt(0, 12))
    pool.free("a")
    pool.allocate("x", prompt(900, 8))  # the empty block, then one of a's: its last
    pool.free("x")
    _, cached = pool.allocate("a2", prompt(0, 13))
    assert cached == 8


def test_empty_blocks_are_used_before_cached_ones_are_evicted() -> None:
    pool = BlockPool(num_blocks=4, block_size=4)
    computed(pool, "a", prompt(0, 8))
    pool.free("a")
    pool.allocate("x", prompt(900, 8))  # two empty blocks exist: a's cache survives
    pool.free("x")
    _, cached = pool.allocate("a2", prompt(0, 9))
    assert cached == 8


def test_decode_growth_caches_full_blocks() -> None:
    pool = BlockPool(num_blocks=6, block_size=4)
    tokens = prompt(0, 6)
    computed(pool, "a", tokens)
    generated = [70, 71, 72, 73, 74]
    for t in generated:
        assert pool.may_append("a")
        pool.append_token("a", t)
    assert pool.num_active == 3  # 11 tokens
    pool.free("a")
    # A follow-up turn that starts with the whole conversation reuses the decoded blocks.
    _, cached = pool.allocate("turn2", tokens + generated + [5, 6, 7])
    assert cached == 8
    # The decoded block's hash is the one the router computes from tokens.
    assert sequence_hashes(tokens + generated, 4)[1] in pool._by_hash


def test_growth_needs_a_free_block_at_a_boundary() -> None:
    pool = BlockPool(num_blocks=2, block_size=4)
    pool.allocate("a", prompt(0, 4))
    pool.allocate("b", prompt(10, 4))
    assert not pool.may_append("a")
    with pytest.raises(RuntimeError, match="may_append"):
        pool.append_token("a", 1)
    pool.free("b")
    assert pool.may_append("a")
    pool.append_token("a", 1)
    assert pool.may_append("a")  # room left in the new block


def test_allocation_beyond_capacity_is_refused() -> None:
    pool = BlockPool(num_blocks=2, block_size=4)
    assert pool.num_blocks_needed(9, sequence_hashes(prompt(0, 9), 4)) == 3
    assert not pool.can_allocate(3)
    with pytest.raises(RuntimeError, match="can_allocate"):
        pool.allocate("a", prompt(0, 9))
    assert pool.num_free == 2 and "a" not in pool


def test_blocks_needed_counts_revived_cached_blocks() -> None:
    pool = BlockPool(num_blocks=4, block_size=4)
    tokens = prompt(0, 9)
    computed(pool, "a", tokens)
    hashes = sequence_hashes(tokens, 4)
    assert pool.num_blocks_needed(9, hashes) == 1  # prefix shared with running "a"
    pool.free("a")
    assert pool.num_blocks_needed(9, hashes) == 3  # cached blocks leave the free count


def test_random_workload_keeps_exact_accounting() -> None:
    rng = random.Random(7)
    pool = BlockPool(num_blocks=64, block_size=4)
    live: list[str] = []
    prefixes = [prompt(1000 * i, 24) for i in range(4)]
    for step in range(3000):
        op = rng.random()
        if op < 0.4:
            tokens = rng.choice(prefixes)[: rng.randint(1, 24)] + prompt(step, rng.randint(0, 9))
            hashes = sequence_hashes(tokens, 4)
            if pool.can_allocate(pool.num_blocks_needed(len(tokens), hashes)):
                rid = f"r{step}"
                pool.allocate(rid, tokens, hashes=hashes)
                pool.mark_computed(rid, len(tokens))
                live.append(rid)
        elif op < 0.8 and live:
            rid = rng.choice(live)
            if pool.may_append(rid):
                pool.append_token(rid, rng.randint(0, 50))
        elif live:
            pool.free(live.pop(rng.randrange(len(live))))
        assert_balanced(pool)
        held = sum(b.ref_count for b in pool._blocks)
        assert held == sum(len(s.block_ids) for s in pool._seqs.values())
    for rid in live:
        pool.free(rid)
    assert pool.num_active == 0 and pool.num_free == 64
    assert all(b.ref_count == 0 for b in pool._blocks)


def test_imported_blocks_are_found_by_the_next_request_and_evicted_last_to_first() -> None:
    pool = BlockPool(num_blocks=6, block_size=4)
    tokens = prompt(0, 17)  # 4 full blocks
    hashes = sequence_hashes(tokens, 4)
    taken = pool.insert_cached(hashes)
    assert [i for i, _ in taken] == [0, 1, 2, 3]
    assert pool.num_cached == 4 and pool.num_active == 0
    assert pool.lookup(hashes) == [b for _, b in taken]
    assert pool.insert_cached(hashes) == []  # already held: nothing new
    blocks, cached = pool.allocate("r", tokens)
    assert cached == 16 and blocks[:4] == [b for _, b in taken]
    pool.free("r")
    assert_balanced(pool)
    # Under pressure the tail of an imported prefix goes before its head.
    pool.allocate("x", prompt(100, 12))  # 3 blocks: 2 empty + 1 evicted
    assert pool.lookup(hashes) == [b for _, b in taken][:3]
    assert_balanced(pool)


def test_import_never_evicts_its_own_prefix() -> None:
    pool = BlockPool(num_blocks=3, block_size=4)
    hashes = sequence_hashes(prompt(0, 20), 4)  # 5 blocks, room for 3
    taken = pool.insert_cached(hashes)
    assert [i for i, _ in taken] == [0, 1, 2]
    assert pool.lookup(hashes) == [b for _, b in taken]
    assert_balanced(pool)
