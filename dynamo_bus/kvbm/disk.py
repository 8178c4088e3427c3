"""G3: whole KV blocks in files on disk, under the host tier (G2).

A block the host tier evicts is written here if it was worth it (frequency-aware
admission: by default a block only one request asked for is not worth a disk write),
and a request whose prefix goes on here past what G1 and G2 hold reads those blocks
back instead of recomputing them. Writes and reads run in the tier's own I/O thread,
through NIXL (:mod:`dynamo_bus.kvbm.files` has the files and their format): the engine
never waits for the disk; when the writes fall behind, blocks are skipped instead. The
tier evicts for good.

A block that fails its checks on read is dropped and computed instead. A full disk or
an I/O error turns the tier off with one log line, and its blocks leave the worker's
residency; serving goes on without it.

:class:`DiskTier` is the bookkeeping (:class:`~dynamo_bus.kvbm.tier.BlockTier`) with
admission (:class:`SeenCounter`) and the I/O thread. A tier without files (the
simulated engine's) keeps the bookkeeping only.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dynamo_bus.kvbm.files import BlockFiles
from dynamo_bus.kvbm.nixl import NixlError
from dynamo_bus.kvbm.policy import EvictionPolicy
from dynamo_bus.kvbm.tier import BlockTier

log = logging.getLogger(__name__)


class SeenCounter:
    """How many requests have asked for each block lately (bounded: the least recently
    seen are forgotten first). The disk tier's admission reads it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._count: OrderedDict[int, int] = OrderedDict()

    def add(self, hashes: Iterable[int]) -> None:
        count = self._count
        for h in hashes:
            count[h] = count.get(h, 0) + 1
            count.move_to_end(h)
        while len(count) > self.capacity:
            count.popitem(last=False)

    def __getitem__(self, block_hash: int) -> int:
        return self._count.get(block_hash, 0)


class DiskTier(BlockTier):
    """See the module docstring. ``admit_after``: how many requests must have asked for
    a block before it is worth a disk write (1: every block the host tier evicts)."""

    name = "disk"

    def __init__(self, capacity: int, *, policy: EvictionPolicy | None = None,
                 files: BlockFiles | None = None, admit_after: int = 2) -> None:
        super().__init__(capacity, policy=policy)
        if admit_after < 1:
            raise ValueError("admit_after must be at least 1")
        self.files = files
        self.admit_after = admit_after
        self.seen = SeenCounter(max(4 * capacity, 4096))
        self.disabled: str | None = None
        self.skipped = 0    # blocks not written: seen too rarely, or the writes behind
        self.corrupt = 0    # blocks that failed their checks on read
        self._io: ThreadPoolExecutor | None = None
        self._staging: list[int] = []
        self._writes: set[asyncio.Future[None]] = set()
        if files is not None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvbm-disk")
            self._staging = list(range(files.write_rows))

    @property
    def where(self) -> str:
        files = self.files
        return str(files.directory or files.root) if files is not None else "(simulated)"

    async def start(self) -> None:
        """Open the files and hold the blocks found there (they count as stored)."""
        if self.files is None:
            return
        try:
            found, dropped = await self._run(self.files.open)
        except (OSError, NixlError) as exc:
            self.disable(f"cannot use {self.files.root}: {exc}")
            return
        self.restore(found)
        self.corrupt += dropped
        log.info("KV disk tier: %d blocks of %.0f KiB found in %s%s, room for %d; %s",
                 len(found), self.files.block_bytes / 1024, self.where,
                 f" ({dropped} unreadable or foreign slots dropped)" if dropped else "",
                 self.capacity, "O_DIRECT" if self.files.direct else "buffered I/O")

    async def flush(self) -> None:
        """Wait for the writes under way."""
        while self._writes:
            await asyncio.wait(list(self._writes))

    async def close(self) -> None:
        """Finish the writes under way (a restart finds those blocks), then let go."""
        await self.flush()
        if self._io is not None and self.files is not None:
            await self._run(self.files.close)
            self._io.shutdown(wait=True)
            self._io = None

    def _run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        assert self._io is not None
        return asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def disable(self, reason: str) -> None:
        if self.disabled is not None:
            return
        self.disabled = reason
        log.error("KV disk tier off: %s; serving goes on without it", reason)
        self.discard(list(self._slot))

    def prefix(self, hashes: Sequence[int]) -> int:
        return 0 if self.disabled is not None else super().prefix(hashes)

    def note_seen(self, hashes: Iterable[int], *, first: bool = True) -> None:
        """A request asked for these blocks (its prompt holds them); counted once per
        request, at its ``first`` admission (not again after a preemption)."""
        if first:
            self.seen.add(hashes)

    # -- out --------------------------------------------------------------------------

    def demote(self, victims: Sequence[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
        """The host tier is evicting ``victims`` (hash, host slot): reserve a disk slot
        and a staging row for each worth writing. Returns (hash, host slot, disk slot,
        staging row) for ``stage`` and then ``write_later``."""
        if self.disabled is not None or not victims:
            return []
        want = [(h, s) for h, s in victims if h not in self._slot
                and (self.admit_after == 1 or self.seen[h] >= self.admit_after)]
        if self.files is not None and len(want) > len(self._staging):
            self.skipped += len(want) - len(self._staging)  # writes behind: never wait
            want = want[:len(self._staging)]
        self.skipped += len(victims) - len(want)
        src, slots, _ = self.reserve([h for h, _ in want])
        plan = []
        for i, slot in zip(src, slots, strict=True):
            row = self._staging.pop() if self.files is not None else -1
            plan.append((want[i][0], want[i][1], slot, row))
        return plan

    def stage(self, plan: Sequence[tuple[int, int, int, int]], host_data: Any) -> None:
        """Copy the planned blocks out of the host tier's buffer before their host slots
        are reused; runs in the caller's copy thread."""
        if self.files is not None:
            for _, host_slot, _, row in plan:
                self.files.stage(row, host_data[host_slot])

    def write_later(self, plan: Sequence[tuple[int, int, int, int]], *,
                    staged: bool = True) -> None:
        """Write the staged blocks in the I/O thread; nobody waits for it. ``staged``
        False: their copy out of the host tier failed, so they go."""
        if not plan:
            return
        hashes = [h for h, _, _, _ in plan]
        if self.files is None or not staged:
            self.written(hashes, ok=staged)
            self._staging.extend(row for *_, row in plan if row >= 0)
            return
        items = [(slot, row, h) for h, _, slot, row in plan]

        async def write() -> None:
            ok = False
            try:
                assert self.files is not None
                await self._run(self.files.write, items)
                ok = True
            except (OSError, NixlError) as exc:
                self.disable(f"writing to {self.where} failed ({exc})")
            finally:
                self.written(hashes, ok=ok)
                self._staging.extend(row for _, row, _ in items)

        task = asyncio.ensure_future(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    # -- in ---------------------------------------------------------------------------

    async def read(self, hashes: Sequence[int], sink: Callable[[int, Any], None]) -> int:
        """Read the blocks ``hashes`` (pinned by the caller) back in order, handing each
        run of verified blocks to ``sink(first index, rows)`` in the I/O thread. Returns
        how many were handed over: a block that fails its checks is dropped, and the
        ones after it are not read."""
        if self.files is None or not hashes:
            return len(hashes)
        slots = []
        for h in hashes:  # the tier may have dropped some since (a bad block, or off)
            if self.disabled is not None or h not in self._slot:
                break
            slots.append(self._slot[h])
        try:
            good, bad = await self._run(self.files.read, slots, list(hashes[:len(slots)]),
                                        sink)
        except (OSError, NixlError) as exc:
            self.disable(f"reading from {self.where} failed ({exc})")
            return 0
        if bad:
            self.corrupt += len(bad)
            log.warning("KV disk tier: %d block(s) in %s failed their checksum or were "
                        "cut short; dropped, recomputed instead", len(bad), self.where)
            self.discard(bad)
        return int(good)
