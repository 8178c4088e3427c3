"""What one forward of the reference model reads and writes besides its weights.

Owns :class:`ForwardBatch` (a flat varlen batch: prefill chunks and decode tokens of several
sequences mixed, with the KV slots they write and the blocks they attend to) and
:class:`KVCache` (the paged KV cache: one ``[num_blocks, num_layers, block_size, 2,
kv_heads, dim]`` tensor over the block pool's block ids, each layer a view of it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dynamo_bus.engines.reference.model import ModelConfig


@dataclass
class ForwardBatch:
    """One forward's flat varlen batch: each sequence owns a run of consecutive rows,
    whose K/V go to ``slot_mapping`` (``block_id * block_size + offset``) and which attend
    to the sequence's cached positions (the new ones included) through its block table.

    Attention runs in two groups: every single-token (decode) sequence together in one
    batched call over K/V gathered block by block through ``decode_blocks`` (padded to
    the longest context; ``decode_mask`` hides the padding, ``None`` when all contexts
    are equally long), and each multi-token (prefill) sequence on its own."""

    input_ids: Tensor      # [T] int64
    positions: Tensor      # [T] int64
    slot_mapping: Tensor   # [T] int64
    logits_indices: Tensor  # [N] int64 rows of the flat batch to compute logits for
    decode_rows: Tensor | None   # [D] rows of the flat batch that decode; None: all, in order
    decode_blocks: Tensor | None  # [D, blocks] block table of each decoding row, 0-padded
    decode_width: int            # the longest decoding row's context
    decode_mask: Tensor | None   # [D, 1, 1, width] bool, True where attended
    prefills: list[tuple[int, int, int, Tensor]]  # (start, query_len, context_len, blocks)

    @classmethod
    def build(cls, seqs: Sequence[tuple[Sequence[int], int, Sequence[int]]], block_size: int,
              device: torch.device | str = "cpu",
              want_logits: Sequence[bool] | None = None) -> ForwardBatch:
        """From ``(new_token_ids, num_cached, block_table)`` per sequence: the new tokens
        take positions ``num_cached, num_cached + 1, ...``; logits for each last token
        (only for the sequences ``want_logits`` marks, if given)."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for new, start, table in seqs:
            end = start + len(new)
            if not new or len(table) * block_size < end:
                raise ValueError(f"sequence needs 1+ new tokens and {math.ceil(end / block_size)}"
                                 f" blocks; got {len(new)} tokens and {len(table)} blocks")
            ids.extend(new)
            positions.extend(range(start, end))
            slots.extend(table[p // block_size] * block_size + p % block_size
                         for p in range(start, end))
        lens = [len(new) for new, _, _ in seqs]
        ctxs = [start + n for (_, start, _), n in zip(seqs, lens, strict=True)]
        starts = [0, *accumulate(lens[:-1])]
        last = [s + n - 1 for s, n, w in zip(starts, lens, want_logits or [True] * len(lens),
                                             strict=True) if w]

        def t(values: Any) -> Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        dec = [i for i, n in enumerate(lens) if n == 1]
        decode_rows = decode_blocks = decode_mask = None
        decode_width = 0
        if dec:
            decode_width = max(ctxs[i] for i in dec)
            n_blocks = -(-decode_width // block_size)
            tables = [list(seqs[i][2][:-(-ctxs[i] // block_size)]) for i in dec]
            decode_blocks = t([tb + [0] * (n_blocks - len(tb)) for tb in tables])
            # All rows in batch order (a pure decode step): no gather/scatter of rows.
            decode_rows = None if dec == list(range(len(lens))) else t([starts[i] for i in dec])
            if any(ctxs[i] != decode_width for i in dec):
                offsets = torch.arange(decode_width, device=device)
                dec_ctx = torch.tensor([ctxs[i] for i in dec], device=device)
                decode_mask = (offsets[None, :] < dec_ctx[:, None])[:, None, None, :]
        prefills = [(starts[i], lens[i], ctxs[i], t(list(seqs[i][2][:-(-ctxs[i] // block_size)])))
                    for i in range(len(lens)) if lens[i] > 1]
        return cls(t(ids), t(positions), t(slots), t(last),
                   decode_rows, decode_blocks, decode_width, decode_mask, prefills)


@dataclass
class KVCache:
    """The paged KV cache, in the model's dtype: ``blocks`` is
    ``[num_blocks, num_layers, block_size, 2, kv_heads, dim]``, each token's K heads next
    to its V heads (as the fused projection emits them, so a step writes both with one
    copy and a decode step gathers both with one). A block is one contiguous run of every
    layer's K/V, the layout :class:`~dynamo_bus.engines.base.KVLayout` names: moving
    blocks to and from a KV block manager tier is one copy per run of blocks.
    ``layers[i]`` is layer ``i``'s ``[num_blocks, block_size, 2, kv_heads, dim]`` view,
    what attention reads and writes."""

    blocks: Tensor
    layers: list[Tensor]

    @classmethod
    def allocate(cls, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> KVCache:
        shape = (num_blocks, cfg.num_layers, block_size, 2, cfg.num_kv_heads, cfg.head_dim)
        blocks = torch.zeros(shape, dtype=dtype, device=device)
        return cls(blocks, list(blocks.unbind(1)))

    @property
    def num_blocks(self) -> int:
        return self.layers[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.layers[0].shape[1]
