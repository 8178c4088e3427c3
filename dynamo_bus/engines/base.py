"""The Engine interface every backend implements, and its lifecycle.

Lifecycle, in order:

1. ``__init__`` stores configuration only; it loads nothing.
2. ``await start()`` loads weights / allocates the KV pool. Called once.
3. ``generate(request)`` is an async iterator of ``EngineOutput``; many run at once
   (continuous batching is the engine's business). Each output carries the tokens
   produced since the previous one, so a slow reader gets fewer, larger outputs
   rather than a growing backlog. The last output has ``finish_reason`` set.
4. ``await abort(request_id)`` ends a running ``generate``: its iterator yields a last
   output with ``finish_reason="cancelled"`` and the request's KV blocks are freed.
   Aborting an unknown or finished request is a no-op. Closing the iterator early
   (``aclose()`` or cancelling the task that iterates it) aborts too.
5. ``await stop()`` aborts everything still running and releases resources.
   Idempotent.

KV blocks move between engines whole (the interface disaggregation uses):
``await export_blocks(hashes)`` returns the longest prefix of those chained block hashes
that the engine has computed, as :class:`KVBlocks` (the tensors, their hashes and their
layout); ``await import_blocks(blocks)`` stores them as cached prefix blocks, so the next
request with that prefix starts after it. An engine without a KV cache raises
``NotImplementedError``.

``load()`` is cheap and synchronous: the worker publishes it to the load bucket.
``residency_changes()`` is too: the prefix blocks that became reusable or were evicted
since the previous call (the first call: all of them), which the worker publishes to
the residency bucket for KV-aware routers.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import msgspec

from dynamo_bus.bus.messages import Fingerprint, FinishReason, SamplingOptions


class EngineRequest(msgspec.Struct):
    request_id: str
    token_ids: list[int]
    sampling: SamplingOptions
    # False: the caller reads only the end, so ``generate`` yields once, when the
    # request finishes, with every token (no wake-up per step for nobody).
    stream: bool = True


class EngineOutput(msgspec.Struct):
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    cached_tokens: int = 0
    # With ``sampling.logprobs`` set (k >= 0): the log-probability of each token in
    # ``token_ids`` under the model's raw distribution, and per token the k most likely
    # (token id, log-probability) pairs, most likely first.
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


class KVLayout(msgspec.Struct, frozen=True):
    """How one block's KV is laid out: ``data`` of :class:`KVBlocks` is
    ``[num_blocks, num_layers, block_size, 2 (K, V), num_kv_heads, head_dim]`` of ``dtype``
    (a torch dtype name), the block's tokens in order, keys after RoPE: each layer's part
    of a block is one contiguous run, as a paged cache holds it (so moving blocks in and
    out of it, or of a KV block manager tier, needs no transposition)."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str


@dataclass
class KVBlocks:
    """Whole KV blocks leaving or entering an engine: ``hashes[i]`` is the chained
    sequence hash (:mod:`dynamo_bus.hashing`) of the prefix that ends with block ``i``."""

    layout: KVLayout
    hashes: list[int]
    data: Any  # a tensor (or array) of the layout's shape, on any device

    @property
    def num_blocks(self) -> int:
        return len(self.hashes)


class EngineLoad(msgspec.Struct):
    active_requests: int = 0
    waiting_requests: int = 0
    active_prefill_tokens: int = 0
    active_blocks: int = 0
    total_blocks: int = 0
    tier_blocks: dict[str, int] = {}    # blocks held per KV tier (device, host, ...)
    tier_capacity: dict[str, int] = {}  # and what each tier can hold
    # What moved through each tier below the device pool since start (blocks stored,
    # evicted, onboarded, their bytes, seconds spent onboarding; see PagedKVEngine).
    tier_moves: dict[str, dict[str, float]] = {}


class Engine(abc.ABC):
    """A model executor behind the worker runtime. See the module docstring."""

    name: str = "engine"

    @property
    @abc.abstractmethod
    def fingerprint(self) -> Fingerprint:
        """Model, block size and hash scheme, checked by whoever routes to this engine."""

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Longest prompt + output this engine accepts, in tokens."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]: ...

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def load(self) -> EngineLoad: ...

    def residency_changes(self) -> dict[int, str | None]:
        """Chained block hash -> the fastest tier now holding it (``"device"``,
        ``"host"`` or ``"disk"``; ``None``: gone from this engine), for the hashes whose
        residency changed since the previous call; the first call names every block
        held. An engine without a prefix cache holds nothing."""
        return {}

    async def export_blocks(self, hashes: list[int]) -> KVBlocks:
        """The longest computed prefix of ``hashes``; see the module docstring."""
        raise NotImplementedError(f"the {self.name} engine does not export KV blocks")

    async def import_blocks(self, blocks: KVBlocks) -> int:
        """Store ``blocks`` as cached prefix blocks; returns how many were new here."""
        raise NotImplementedError(f"the {self.name} engine does not import KV blocks")
