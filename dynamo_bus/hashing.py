"""Block hashing: the one definition of a KV block's identity, shared by engine, KVBM
and router.

The scheme is Dynamo's (``lib/kv-router`` ``compute_block_hash_for_seq`` and
``lib/tokens``), so hashes compare byte for byte with a Dynamo deployment:

* tokens are cut into full blocks of ``block_size``; a trailing partial block has no hash;
* a block's *local* hash is ``xxh3_64(le_u32 tokens, seed)`` with ``seed = 1337``;
* a LoRA adapter changes that seed to ``(1337 + xxh3_64(lora_name, seed=0)) mod 2**64``
  (an empty name counts as no adapter);
* *sequence* hashes chain the local ones: ``seq[0] = local[0]`` and
  ``seq[i] = xxh3_64(le_u64(seq[i-1]) || le_u64(local[i]), seed=1337)``; the chain seed
  stays 1337 under LoRA, because the adapter already shows in every local hash.

A change to any of this must change ``HASH_SCHEME``: workers advertise it in their
fingerprint, and a router refuses a worker whose scheme differs.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import xxhash

HASH_SCHEME = "xxh3_64-seed1337-v1"
XXH3_SEED = 1337

_U64 = (1 << 64) - 1
_PAIR = struct.Struct("<QQ")

TokenIds = Sequence[int] | npt.NDArray[np.integer]


def lora_seed(lora_name: str | None = None) -> int:
    """The seed for local block hashes of a request served with ``lora_name``."""
    if not lora_name:
        return XXH3_SEED
    return (XXH3_SEED + xxhash.xxh3_64_intdigest(lora_name.encode())) & _U64


def _token_bytes(token_ids: TokenIds) -> bytes:
    try:
        arr = np.asarray(token_ids, dtype="<u4")
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"token ids must fit in an unsigned 32-bit integer: {exc}") from exc
    if isinstance(token_ids, np.ndarray) and token_ids.dtype != arr.dtype:
        # A wider integer array converts silently with wrap-around; refuse instead, as
        # a wrapped id would hash as a different token.
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() > 0xFFFFFFFF):
            raise ValueError("token ids must fit in an unsigned 32-bit integer")
    return arr.tobytes()


def block_hash(token_ids: TokenIds, seed: int = XXH3_SEED) -> int:
    """The local hash of one block's tokens (``seed`` from ``lora_seed``)."""
    return xxhash.xxh3_64_intdigest(_token_bytes(token_ids), seed)


def chain_hash(parent: int, local: int) -> int:
    """The sequence hash of a block whose parent block has sequence hash ``parent``."""
    return xxhash.xxh3_64_intdigest(_PAIR.pack(parent, local), XXH3_SEED)


def local_block_hashes(token_ids: TokenIds, block_size: int,
                       lora_name: str | None = None) -> list[int]:
    """Local hashes of every full block of ``token_ids``."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_blocks = len(token_ids) // block_size
    if n_blocks == 0:
        return []
    # One conversion for the whole prompt, then zero-copy slices per block.
    view = memoryview(_token_bytes(token_ids[: n_blocks * block_size]))
    step = 4 * block_size
    seed = lora_seed(lora_name)
    digest = xxhash.xxh3_64_intdigest
    return [digest(view[i : i + step], seed) for i in range(0, n_blocks * step, step)]


def sequence_hashes_from_local(local: Sequence[int]) -> list[int]:
    """Chain local block hashes into sequence hashes."""
    if not local:
        return []
    out = [local[0]]
    pack = _PAIR.pack
    digest = xxhash.xxh3_64_intdigest
    parent = local[0]
    for h in local[1:]:
        parent = digest(pack(parent, h), XXH3_SEED)
        out.append(parent)
    return out


def sequence_hashes(token_ids: TokenIds, block_size: int,
                    lora_name: str | None = None) -> list[int]:
    """Chained sequence hashes of every full block of ``token_ids``."""
    return sequence_hashes_from_local(local_block_hashes(token_ids, block_size, lora_name))


def prefix_hash(token_ids: TokenIds, block_size: int,
                lora_name: str | None = None) -> int | None:
    """The sequence hash of the last full block, or ``None`` when there is no full block."""
    seq = sequence_hashes(token_ids, block_size, lora_name)
    return seq[-1] if seq else None
