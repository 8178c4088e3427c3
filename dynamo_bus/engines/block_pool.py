"""A ref-counted pool of KV blocks with prefix caching, keyed by chained sequence hashes.

Every block is in exactly one of three states:

* **active**: held by one or more requests (``ref_count > 0``);
* **cached**: held by nobody but still holding a reusable prefix, findable by its hash;
  evicted in LRU order, and only when a free block is needed;
* **empty**: held by nobody and holding nothing.

``num_active + num_free == num_blocks`` always, where ``num_free`` counts cached and
empty blocks (both can be handed out) and ``num_cached`` counts the cached ones.

A prompt block becomes findable once it is computed (``mark_computed``); a block grown
during decode becomes findable when it fills (``append_token``). A block whose hash is
already held by another block stays unhashed: two copies of one prefix are never
indexed, and the duplicate simply returns to the empty list when freed.

Once ``drain_changes()`` has been called, the pool records which hashes became findable
or stopped being findable since the previous call: what a worker publishes to the
residency bucket, so routers know which prefixes it holds.

Once ``record_evictions()`` has been called, the pool also lists the cached blocks it
evicted (``take_evicted()``): their KV is still intact until the next step writes the
blocks' new owners, so a KV block manager below the pool copies them out first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from dynamo_bus.hashing import block_hash, chain_hash, lora_seed, sequence_hashes


class _Block:
    __slots__ = ("block_id", "hash", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None


class _Seq:
    """One request's view of the pool."""

    __slots__ = ("block_ids", "hashes", "num_indexed", "num_tokens", "seed", "tail")

    def __init__(self, seed: int) -> None:
        self.block_ids: list[int] = []
        self.hashes: list[int] = []      # sequence hashes of this request's full blocks
        self.num_indexed = 0             # leading entries of ``hashes`` already processed
        self.num_tokens = 0
        self.tail: list[int] = []        # tokens of the last, partial block
        self.seed = seed


class BlockPool:
    """See the module docstring. Not thread-safe: one scheduler owns it."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._empty: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._by_hash: dict[int, int] = {}
        self._seqs: dict[str, _Seq] = {}
        # hash -> findable now? (the latest word since the previous drain); None until
        # somebody drains, so a pool nobody publishes keeps no log.
        self._changes: dict[int, bool] | None = None
        self._evicted: list[tuple[int, int]] | None = None  # (hash, block id)
        self._indexed: list[tuple[int, int]] | None = None  # (hash, block id)

    # -- counters ---------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._empty) + len(self._cached)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_active(self) -> int:
        return self.num_blocks - self.num_free

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._seqs

    # -- allocation -------------------------------------------------------------------

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def _prefix_hits(self, num_tokens: int, hashes: Sequence[int]) -> list[int]:
        # At least one token must be computed to produce logits, so a fully cached
        # prompt still recomputes its last block (vLLM does the same).
        max_hits = min(len(hashes), (num_tokens - 1) // self.block_size)
        hits = []
        for h in hashes[:max_hits]:
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def num_blocks_needed(self, num_tokens: int, hashes: Sequence[int]) -> int:
        """Free blocks that ``allocate`` would take for these tokens (``hashes`` from
        ``sequence_hashes``): new blocks plus cached blocks it would revive."""
        hits = self._prefix_hits(num_tokens, hashes)
        revived = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        return -(-num_tokens // self.block_size) - len(hits) + revived

    def allocate(self, request_id: str, token_ids: Sequence[int], *,
                 hashes: Sequence[int] | None = None,
                 lora_name: str | None = None) -> tuple[list[int], int]:
        """Give ``request_id`` blocks for ``token_ids``, reusing the longest cached prefix.

        Returns the block ids and how many leading tokens are already computed.
        ``hashes`` saves re-hashing when the caller has ``sequence_hashes`` already.
        """
        if request_id in self._seqs:
            raise ValueError(f"request {request_id!r} already holds blocks")
        if not token_ids:
            raise ValueError("cannot allocate blocks for an empty sequence")
        bs = self.block_size
        if hashes is None:
            hashes = sequence_hashes(token_ids, bs, lora_name)
        hits = self._prefix_hits(len(token_ids), hashes)
        n_new = -(-len(token_ids) // bs) - len(hits)
        revived = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        if n_new + revived > self.num_free:
            raise RuntimeError(f"pool has {self.num_free} free blocks, request "
                               f"{request_id!r} needs {n_new + revived}: check can_allocate")
        for block_id in hits:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._cached[block_id]
            block.ref_count += 1
        seq = _Seq(lora_seed(lora_name))
        seq.block_ids = hits + [self._take_free() for _ in range(n_new)]
        seq.hashes = list(hashes)
        seq.num_indexed = len(hits)
        seq.num_tokens = len(token_ids)
        n_full = len(token_ids) // bs
        seq.tail = list(token_ids[n_full * bs:])
        self._seqs[request_id] = seq
        return list(seq.block_ids), len(hits) * bs

    def _take_free(self) -> int:
        if self._empty:
            block_id = self._empty.popleft()
        else:
            block_id, _ = self._cached.popitem(last=False)
            block = self._blocks[block_id]
            del self._by_hash[block.hash]  # type: ignore[arg-type]
            if self._changes is not None:
                self._changes[block.hash] = False  # type: ignore[index]
            if self._evicted is not None:
                self._evicted.append((block.hash, block_id))  # type: ignore[arg-type]
            block.hash = None
        self._blocks[block_id].ref_count = 1
        return block_id

    def _index(self, seq: _Seq, upto: int) -> None:
        """Make ``seq``'s first ``upto`` full blocks findable by hash."""
        upto = min(upto, len(seq.hashes))
        for i in range(seq.num_indexed, upto):
            h = seq.hashes[i]
            if h not in self._by_hash:
                block = self._blocks[seq.block_ids[i]]
                block.hash = h
                self._by_hash[h] = block.block_id
                if self._changes is not None:
                    self._changes[h] = True
                if self._indexed is not None:
                    self._indexed.append((h, block.block_id))
        seq.num_indexed = max(seq.num_indexed, upto)

    def mark_computed(self, request_id: str, num_tokens: int) -> None:
        """The first ``num_tokens`` tokens of the request now have KV: cache full blocks."""
        self._index(self._seqs[request_id], num_tokens // self.block_size)

    def drain_changes(self) -> dict[int, bool]:
        """Hashes that became findable (True) or were evicted (False) since the last
        call, each with its latest state. The first call returns every findable hash
        and starts the log."""
        if self._changes is None:
            self._changes = {}
            return dict.fromkeys(self._by_hash, True)
        changes, self._changes = self._changes, {}
        return changes

    def record_evictions(self) -> None:
        """From now on, list the cached blocks evicted (see ``take_evicted``)."""
        if self._evicted is None:
            self._evicted = []

    @property
    def has_evicted(self) -> bool:
        """Whether ``take_evicted`` has anything."""
        return bool(self._evicted)

    def take_evicted(self) -> list[tuple[int, int]]:
        """``(hash, block_id)`` of each cached block evicted since the last call, in
        order; a block's KV stays readable until the next step writes it."""
        if not self._evicted:
            return []
        evicted, self._evicted = self._evicted, []
        return evicted

    def record_indexed(self) -> None:
        """From now on, list the blocks a request's own steps made findable (see
        ``take_indexed``); blocks brought in by ``insert_cached`` are not listed."""
        if self._indexed is None:
            self._indexed = []

    def take_indexed(self) -> list[tuple[int, int]]:
        """``(hash, block_id)`` of each block made findable since the last call; its KV
        is complete once the step that was planned with it has run."""
        if not self._indexed:
            return []
        indexed, self._indexed = self._indexed, []
        return indexed

    def holds(self, block_hash: int) -> bool:
        """Whether a computed block with this hash is findable here."""
        return block_hash in self._by_hash

    def block_table(self, request_id: str) -> list[int]:
        """The request's blocks, in order (the list itself: do not modify)."""
        return self._seqs[request_id].block_ids

    # -- moving whole blocks between engines ------------------------------------------

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """Blocks holding the longest computed prefix of ``hashes`` (active or cached)."""
        found = []
        for h in hashes:
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def insert_cached(self, hashes: Sequence[int]) -> list[tuple[int, int]]:
        """Take free blocks for the leading ``hashes`` this pool does not hold yet, as
        many as are free without evicting a block named in ``hashes``, and make them
        cached (findable, held by nobody): ``(index in hashes, block_id)`` pairs whose
        contents the caller writes before the next step. Blocks for hashes already
        held are kept as they are."""
        wanted = set(hashes)
        taken: list[tuple[int, int]] = []
        for i, h in enumerate(hashes):
            if h in self._by_hash:
                continue
            if not self._empty:
                # Evict the least recently used block that is not part of this prefix.
                victim = next((b for b in self._cached if self._blocks[b].hash not in wanted),
                              None)
                if victim is None:
                    break
                self._cached.move_to_end(victim, last=False)
            block_id = self._take_free()
            block = self._blocks[block_id]
            block.hash = h
            self._by_hash[h] = block_id
            if self._changes is not None:
                self._changes[h] = True
            taken.append((i, block_id))
        # Held by nobody: cached, the tail nearest the LRU end as ``free`` leaves it.
        for _, block_id in reversed(taken):
            self._blocks[block_id].ref_count = 0
            self._cached[block_id] = None
        return taken

    # -- decode growth ----------------------------------------------------------------

    def may_append(self, request_id: str) -> bool:
        """Whether one more token fits (it needs a new block only at a block boundary)."""
        seq = self._seqs[request_id]
        return seq.num_tokens % self.block_size != 0 or self.num_free > 0

    def append_token(self, request_id: str, token_id: int) -> None:
        """Grow the request by one token; a block that fills becomes cached."""
        seq = self._seqs[request_id]
        if seq.num_tokens % self.block_size == 0:
            if self.num_free == 0:
                raise RuntimeError(f"no free block to grow {request_id!r}: check may_append")
            seq.block_ids.append(self._take_free())
        seq.tail.append(token_id)
        seq.num_tokens += 1
        if len(seq.tail) == self.block_size:
            local = block_hash(seq.tail, seq.seed)
            seq.hashes.append(chain_hash(seq.hashes[-1], local) if seq.hashes else local)
            seq.tail = []
            if seq.num_indexed == len(seq.hashes) - 1:
                self._index(seq, len(seq.hashes))

    # -- release ----------------------------------------------------------------------

    def free(self, request_id: str) -> None:
        """Return the request's blocks. Unknown ids are ignored, so aborts are idempotent."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        # Tail blocks first, so they reach the LRU end before their prefix and are
        # evicted first: a prefix outlives its continuations.
        for block_id in reversed(seq.block_ids):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self._empty.append(block_id)
                else:
                    self._cached[block_id] = None
