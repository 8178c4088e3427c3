"""What one request is to the batching scheduler (:mod:`dynamo_bus.engines.scheduler`).

Owns :class:`Seq` (a request's tokens, block hashes, progress through prefill and the
output not yet read), :class:`Sampled` (one token an engine's step chose for a sequence)
and :func:`new_seq`, the checks a request must pass against an engine's limits (vocabulary,
context length, KV pool size) before it becomes a :class:`Seq`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from dynamo_bus.bus.messages import FinishReason, SamplingOptions
from dynamo_bus.engines.base import EngineRequest
from dynamo_bus.errors import InvalidRequest, PromptTooLong
from dynamo_bus.hashing import sequence_hashes


class Sampled(NamedTuple):
    """One token chosen for a sequence, with its log-probabilities when asked for."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass(slots=True, eq=False)
class Seq:
    """The scheduler's view of one request."""

    request_id: str
    tokens: list[int]            # prompt + generated tokens that need KV
    hashes: list[int]            # sequence hashes of ``tokens`` when last hashed
    sampling: SamplingOptions
    stop_ids: frozenset[int]
    state: Any = None            # the executing engine's own per-request state
    num_computed: int = 0        # tokens whose KV is computed
    num_in_pool: int = 0         # tokens holding a slot in the pool
    prefill_target: int = 0      # len(tokens) at the last admission; 0 before the first
    num_output: int = 0
    cached_tokens: int = 0
    running: bool = False
    finish: FinishReason | None = None
    pending: list[int] = field(default_factory=list)
    pending_logprobs: list[float] = field(default_factory=list)
    pending_top: list[list[tuple[int, float]]] = field(default_factory=list)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    stream: bool = True          # wake the reader per step (False: only at the end)
    onboarding: asyncio.Task[None] | None = None  # its prefix is being copied in (G2)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prefill_target


def new_seq(request: EngineRequest, *, vocab_size: int, context_length: int,
            block_size: int, num_blocks: int, eos_token_ids: tuple[int, ...]) -> Seq:
    """The :class:`Seq` of a request that fits these limits; raises the error the user
    is told otherwise."""
    prompt, sampling = request.token_ids, request.sampling
    if not prompt:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if sampling.max_tokens < 1:
        raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
    arr = np.asarray(prompt)  # an object array if some id is beyond int64
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise InvalidRequest(f"token ids must be in [0, {vocab_size})", param="prompt")
    total = len(prompt) + sampling.max_tokens
    if len(prompt) >= context_length or total > context_length:
        raise PromptTooLong(
            f"this model's maximum context length is {context_length} tokens; "
            f"the request has {len(prompt)} prompt tokens and asks for "
            f"{sampling.max_tokens} more",
            param="prompt" if len(prompt) >= context_length else "max_tokens")
    if -(-total // block_size) > num_blocks:
        raise InvalidRequest(
            f"the request needs {-(-total // block_size)} KV blocks; this engine "
            f"has {num_blocks} in all", code="kv_cache_too_small")
    stop_ids = set(sampling.stop_token_ids)
    if not sampling.ignore_eos:
        stop_ids.update(eos_token_ids)
    return Seq(request.request_id, list(prompt), sequence_hashes(arr, block_size), sampling,
               frozenset(stop_ids), stream=request.stream)
