"""The router's index of which worker holds which KV block, and in which tier.

Built from the residency stream and snapshots (:mod:`dynamo_bus.routing.residency_watch`)
by a live router, or
straight from simulated engines by :mod:`dynamo_bus.traces.simulate`; read by the routing policy
(:mod:`dynamo_bus.routing.policy`) to find each worker's cached prefix of a prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dynamo_bus.bus.messages import TIERS

TIER_RANK = {t: i for i, t in enumerate(TIERS)}  # device 0, host 1, disk 2



def residency_instance(started_at: float) -> int:
    """The incarnation a worker's residency carries: its start time (``Registration.
    started_at``, seconds) in nanoseconds, so a router reading either agrees."""
    return int(started_at * 1e9)

class ResidencyIndex:
    """block hash -> {worker: fastest tier}, each worker's block count and incarnation.

    Memory matters at a million blocks: a block held by one worker (the common case)
    is stored as one int ``worker_number * 4 + tier``, a shared one as a small dict."""

    def __init__(self) -> None:
        self._numbers: dict[str, int] = {}
        self._names: list[str] = []
        self._blocks: dict[int, int | dict[int, int]] = {}
        self._counts: list[int] = []
        self._instances: dict[str, int] = {}
        self.updates = 0  # changes applied, for rate figures

    def _number(self, worker_id: str) -> int:
        n = self._numbers.get(worker_id)
        if n is None:
            n = self._numbers[worker_id] = len(self._names)
            self._names.append(worker_id)
            self._counts.append(0)
        return n

    # -- updates ----------------------------------------------------------------------

    def observe_instance(self, worker_id: str, instance: int) -> bool:
        """Note the worker's incarnation; False when ``instance`` is older than one
        already seen (its news is stale). A newer one forgets the older one's blocks."""
        known = self._instances.get(worker_id, 0)
        if instance < known:
            return False
        if instance > known:
            if known:
                self.remove_worker(worker_id)
            self._instances[worker_id] = instance
        return True

    def apply(self, worker_id: str, block_hash: int, tier: str | None,
              instance: int = 0) -> None:
        """The worker now holds ``block_hash`` in ``tier`` (``None``: no longer)."""
        if instance and not self.observe_instance(worker_id, instance):
            return
        self.updates += 1
        w = self._number(worker_id)
        if tier is None:
            self._drop(w, block_hash)
        else:
            self._put(w, block_hash, TIER_RANK[tier])

    def apply_batch(self, worker_id: str, instance: int, stored: Iterable[int],
                    ranks: Iterable[int], removed: Iterable[int]) -> bool:
        """One residency batch of the worker: ``stored`` now held, each in the tier of
        the same position in ``ranks`` (0 device, 1 host, 2 disk), ``removed`` no longer.
        False when ``instance`` is older than one already seen (nothing applied)."""
        if not self.observe_instance(worker_id, instance):
            return False
        w = self._number(worker_id)
        n = 0
        for h, rank in zip(stored, ranks, strict=True):
            self._put(w, h, rank)
            n += 1
        for h in removed:
            self._drop(w, h)
            n += 1
        self.updates += n
        return True

    def load_worker(self, worker_id: str, instance: int, hashes: Sequence[int],
                    ranks: Sequence[int]) -> bool:
        """Replace everything the worker holds with ``hashes`` (in ``ranks``): a
        snapshot. Bulk: a million blocks load in well under a second."""
        if not self.observe_instance(worker_id, instance):
            return False
        if len(hashes) != len(ranks):
            raise ValueError(f"{len(hashes)} hashes but {len(ranks)} tiers")
        self.remove_worker(worker_id)
        w = self._number(worker_id)
        base = w * 4
        fresh: dict[int, int]
        if ranks and ranks.count(ranks[0]) == len(ranks):  # one tier (the usual case)
            fresh = dict.fromkeys(hashes, base + ranks[0])
        else:
            fresh = dict(zip(hashes, [base + r for r in ranks], strict=True))
        blocks = self._blocks
        if not blocks:
            self._blocks = fresh  # type: ignore[assignment]  # one holder per block
        else:
            small, big = (fresh, blocks) if len(fresh) <= len(blocks) else (blocks, fresh)
            for h in [h for h in small if h in big]:  # also held by another worker
                self._put(w, h, fresh.pop(h) & 3)
            blocks.update(fresh)
        self._counts[w] += len(fresh)
        self.updates += len(hashes)
        return True

    def _put(self, w: int, block_hash: int, rank: int) -> None:
        held = self._blocks.get(block_hash)
        if held is None:
            self._blocks[block_hash] = w * 4 + rank
            self._counts[w] += 1
        elif isinstance(held, int):
            if held >> 2 == w:
                self._blocks[block_hash] = w * 4 + rank
            else:
                self._blocks[block_hash] = {held >> 2: held & 3, w: rank}
                self._counts[w] += 1
        else:
            if w not in held:
                self._counts[w] += 1
            held[w] = rank

    def _drop(self, w: int, block_hash: int) -> None:
        held = self._blocks.get(block_hash)
        if held is None:
            return
        if isinstance(held, int):
            if held >> 2 == w:
                del self._blocks[block_hash]
                self._counts[w] -= 1
        elif held.pop(w, None) is not None:
            self._counts[w] -= 1
            if len(held) == 1:
                ((other, t),) = held.items()
                self._blocks[block_hash] = other * 4 + t

    def remove_worker(self, worker_id: str) -> None:
        """Forget every block of a worker that left (a scan: workers leave rarely)."""
        w = self._numbers.get(worker_id)
        if w is None or self._counts[w] == 0:
            return
        for h in [h for h, held in self._blocks.items()
                  if (held >> 2 == w if isinstance(held, int) else w in held)]:
            self._drop(w, h)
        self._counts[w] = 0

    def replace_with(self, other: ResidencyIndex) -> None:
        """Become ``other`` (a rebuilt index), keeping this object's identity."""
        updates = self.updates + other.updates
        self.__dict__.update(other.__dict__)
        self.updates = updates

    # -- queries ----------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Distinct blocks held anywhere."""
        return len(self._blocks)

    def blocks_of(self, worker_id: str) -> int:
        w = self._numbers.get(worker_id)
        return 0 if w is None else self._counts[w]

    def overlaps(self, hashes: Sequence[int],
                 worker_ids: Iterable[str]) -> dict[str, tuple[int, int, int]]:
        """For each worker, how many of the leading ``hashes`` it holds (its cached
        prefix: counting stops at its first missing block), split by the fastest tier
        holding each: ``(device, host, disk)``."""
        counts = {wid: [0, 0, 0] for wid in worker_ids}
        live = {n: counts[wid] for wid in counts
                if (n := self._numbers.get(wid)) is not None and self._counts[n]}
        blocks = self._blocks
        for h in hashes:
            if not live:
                break
            held = blocks.get(h)
            if held is None:
                break
            if isinstance(held, int):
                c = live.get(held >> 2)
                live = {}
                if c is not None:
                    c[held & 3] += 1
                    live[held >> 2] = c
            else:
                for n in [n for n in live if n not in held]:
                    del live[n]
                for n, c in live.items():
                    c[held[n]] += 1
        return {wid: (c[0], c[1], c[2]) for wid, c in counts.items()}
