"""Decode steps replayed from captured CUDA graphs.

A decode step of a small model on a GPU is bound by the host: some 15 kernel launches per
layer, each a few microseconds of Python and driver work, for kernels that run in less.
A CUDA graph records a step's kernels once and replays them with one launch. A graph has
fixed shapes and fixed buffers, so :class:`DecodeGraphs` keeps one static int64 buffer
(per row: token, position, KV slot, context length, then the block table), rounds a step
up to a *batch bucket* (1, 2, 4, 8, then multiples of 8) and a *width bucket* (its longest
block table rounded up to a power of two), and records one graph per bucket pair on first
use. All graphs share one memory pool: they never run at once, and a step's logits are
sampled before the next replay overwrites them.

Padding rows decode token 0 at position 0 into a *scratch block* that the block pool never
hands out (the cache is allocated one block larger), attending to that one slot only, so
they touch no sequence's KV. Each row attends through a mask of its own context length,
which is what makes a padded width exact: SDPA gives masked positions no weight.

The same code runs without capture (``capture=False``): the CPU tests use that to check
bucketing, padding and the scratch block against the ordinary eager step.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from dynamo_bus.engines.reference.batch import ForwardBatch, KVCache
from dynamo_bus.engines.reference.model import CausalLM

log = logging.getLogger(__name__)

COLUMNS = 4  # token, position, slot, context length; the block table follows


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to ``max_batch`` (which is always the last)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return [*sizes, max_batch]


def width_buckets(max_blocks: int) -> list[int]:
    """Powers of two below ``max_blocks``, then ``max_blocks``."""
    widths, w = [], 1
    while w < max_blocks:
        widths.append(w)
        w *= 2
    return [*widths, max_blocks]


class DecodeRunner(Protocol):
    """What the engine asks of graph-replayed decode steps (:class:`DecodeGraphs`)."""

    @property
    def num_graphs(self) -> int: ...

    def fits(self, batch: int, blocks: int) -> bool: ...

    def run(self, decodes: Sequence[tuple[int, int, Sequence[int]]]) -> Tensor: ...


class DecodeGraphs:
    """See the module docstring. ``run`` takes a pure decode step (one new token per
    sequence) that ``fits``; its logits stay valid until the next ``run``."""

    def __init__(self, model: CausalLM, kv: KVCache, *, scratch_block: int, max_batch: int,
                 max_blocks: int, capture: bool) -> None:
        if not 0 <= scratch_block < kv.num_blocks:
            raise ValueError(f"scratch block {scratch_block} is not in the KV cache")
        self.model, self.kv, self.capture = model, kv, capture
        self.scratch = scratch_block
        self.block_size = kv.block_size
        self.batch_sizes = batch_buckets(max_batch)
        self.widths = width_buckets(max_blocks)
        device = kv.layers[0].device
        self._static = torch.zeros((max_batch, COLUMNS + max_blocks), dtype=torch.int64,
                                   device=device)
        self._rows = torch.arange(max_batch, device=device)
        self._offsets = torch.arange(max_blocks * self.block_size, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def fits(self, batch: int, blocks: int) -> bool:
        return 0 < batch <= self.batch_sizes[-1] and blocks <= self.widths[-1]

    def run(self, decodes: Sequence[tuple[int, int, Sequence[int]]]) -> Tensor:
        """Logits ``[len(decodes), vocab]`` for ``(token, position, block_table)`` rows."""
        bs, n = self.block_size, len(decodes)
        need = max(pos // bs + 1 for _, pos, _ in decodes)
        if not self.fits(n, need):
            raise ValueError(f"a decode step of {n} rows and {need} blocks does not fit")
        b = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        nb = self.widths[bisect.bisect_left(self.widths, need)]
        pad = [0, 0, self.scratch * bs, 1] + [self.scratch] * nb
        rows = []
        for token, pos, table in decodes:
            used = pos // bs + 1
            rows.append([token, pos, table[pos // bs] * bs + pos % bs, pos + 1,
                         *table[:used], *[self.scratch] * (nb - used)])
        rows.extend([pad] * (b - n))
        self._static[:b, :COLUMNS + nb].copy_(torch.tensor(rows, dtype=torch.int64),
                                              non_blocking=True)
        if not self.capture:
            return self._forward(b, nb)[:n]
        entry = self._graphs.get((b, nb))
        if entry is None:
            entry = self._graphs[(b, nb)] = self._record(b, nb)
        graph, logits = entry
        graph.replay()
        return logits[:n]

    def _forward(self, b: int, nb: int) -> Tensor:
        """The model's step over the static buffer's first ``b`` rows and ``nb`` blocks."""
        s = self._static[:b]
        ids, positions, slots, ctx = (s[:, i].contiguous() for i in range(COLUMNS))
        width = nb * self.block_size
        mask = (self._offsets[None, :width] < ctx[:, None])[:, None, None, :]
        batch = ForwardBatch(input_ids=ids, positions=positions, slot_mapping=slots,
                             logits_indices=self._rows[:b], decode_rows=None,
                             decode_blocks=s[:, COLUMNS:COLUMNS + nb].contiguous(),
                             decode_width=width, decode_mask=mask, prefills=[])
        return self.model(batch, self.kv)

    def _record(self, b: int, nb: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # Warm up on a side stream first (lazy initialisation, library workspaces), as
        # capture requires; the warm-up computes this very step, so the K/V it writes
        # are the values the replay writes again.
        device = self._static.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(b, nb)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work on other threads (a KV export) does not void the capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._forward(b, nb)
        log.debug("reference engine: recorded a decode graph for batch %d, %d blocks", b, nb)
        return graph, logits
