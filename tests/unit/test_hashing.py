"""Block hashing must equal Dynamo's, so routing and cache hits agree with a Dynamo cluster."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from dynamo_bus.bus.messages import Fingerprint
from dynamo_bus.hashing import (
    HASH_SCHEME,
    XXH3_SEED,
    block_hash,
    chain_hash,
    local_block_hashes,
    lora_seed,
    prefix_hash,
    sequence_hashes,
    sequence_hashes_from_local,
)

# Golden values from Dynamo's lib/tokens (tokens.rs, test_tokens_blocks and the
# TokenBlockSequence tests): tokens 1..12, block size 4, seed 1337.
DYNAMO_LOCAL = [14643705804678351452, 16777012769546811212, 483935686894639516]
DYNAMO_SEQ = [14643705804678351452, 4945711292740353085, 12583592247330656132]


def test_matches_dynamo_golden_vectors() -> None:
    tokens = list(range(1, 13))
    assert local_block_hashes(tokens, 4) == DYNAMO_LOCAL
    assert sequence_hashes(tokens, 4) == DYNAMO_SEQ
    assert prefix_hash(tokens, 4) == DYNAMO_SEQ[-1]


def test_only_full_blocks_are_hashed() -> None:
    tokens = list(range(1, 11))  # two full blocks of 4 and a partial one
    assert sequence_hashes(tokens, 4) == DYNAMO_SEQ[:2]
    assert prefix_hash(tokens, 4) == DYNAMO_SEQ[1]
    assert prefix_hash([1, 2, 3], 4) is None
    assert sequence_hashes([], 4) == []


def test_numpy_and_list_inputs_agree() -> None:
    tokens = list(range(1, 13))
    for arr in (np.asarray(tokens, dtype=np.int64), np.asarray(tokens, dtype=np.uint32)):
        assert sequence_hashes(arr, 4) == DYNAMO_SEQ


def test_building_blocks_compose_to_the_chain() -> None:
    tokens = list(range(1, 13))
    local = [block_hash(tokens[i:i + 4]) for i in range(0, 12, 4)]
    assert local == DYNAMO_LOCAL
    assert chain_hash(local[0], local[1]) == DYNAMO_SEQ[1]
    assert sequence_hashes_from_local(local) == DYNAMO_SEQ


def test_a_changed_token_changes_its_block_and_every_later_one() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50_000, size=160).tolist()
    changed = list(tokens)
    changed[70] += 1  # block 4 of 16-token blocks
    a, b = sequence_hashes(tokens, 16), sequence_hashes(changed, 16)
    assert a[:4] == b[:4]
    assert all(x != y for x, y in zip(a[4:], b[4:], strict=True))
    # Local hashes of the other blocks are unaffected: they do not chain.
    la, lb = local_block_hashes(tokens, 16), local_block_hashes(changed, 16)
    assert [i for i in range(10) if la[i] != lb[i]] == [4]


def test_lora_seeds_local_hashes_like_dynamo() -> None:
    tokens = list(range(1, 13))
    seed = (XXH3_SEED + xxhash.xxh3_64_intdigest(b"alpha-7b", 0)) % 2**64
    assert lora_seed("alpha-7b") == seed
    expected_local = [xxhash.xxh3_64_intdigest(
        np.asarray(tokens[i:i + 4], dtype="<u4").tobytes(), seed) for i in range(0, 12, 4)]
    assert local_block_hashes(tokens, 4, "alpha-7b") == expected_local
    # The chain keeps seed 1337: the adapter is already in every local hash.
    assert sequence_hashes(tokens, 4, "alpha-7b") == sequence_hashes_from_local(expected_local)
    assert set(sequence_hashes(tokens, 4, "alpha-7b")).isdisjoint(DYNAMO_SEQ)
    assert sequence_hashes(tokens, 4, "beta") != sequence_hashes(tokens, 4, "alpha-7b")


def test_empty_lora_name_is_the_base_model() -> None:
    assert lora_seed("") == lora_seed(None) == XXH3_SEED
    assert sequence_hashes(list(range(1, 13)), 4, "") == DYNAMO_SEQ


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="block_size"):
        sequence_hashes([1, 2, 3], 0)
    with pytest.raises(ValueError, match="32-bit"):
        sequence_hashes([-1, 2, 3, 4], 4)
    with pytest.raises(ValueError, match="32-bit"):
        sequence_hashes([2**32, 2, 3, 4], 4)
    with pytest.raises(ValueError, match="32-bit"):
        sequence_hashes(np.asarray([2**32, 2, 3, 4], dtype=np.int64), 4)


def test_scheme_name_is_the_fingerprint_default() -> None:
    assert Fingerprint(model="m", block_size=16).hash_scheme == HASH_SCHEME
