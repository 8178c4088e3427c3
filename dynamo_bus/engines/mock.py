"""The simulated engine: real scheduling, real block pool and real hashes, fake compute.

``MockEngine`` runs Dynamo's mocker timing model so routers, workers and the bus can be
exercised at scale without a model. One scheduler task (owned by the engine, cancelled
in ``stop()``) runs steps in the style of vLLM v1:

* running requests are served first, oldest first: one token each for those decoding,
  a chunk of the prompt for those still prefilling (chunked prefill under
  ``max_num_batched_tokens``);
* waiting requests are then admitted in arrival order while ``max_num_seqs`` and the
  pool allow; admission reuses cached prefix blocks;
* when a decoding request needs a block and none is free, the newest running request is
  preempted (its blocks freed; it re-prefills later, usually from the prefix cache).

A step lasts, in milliseconds divided by ``speedup``, ``prefill(T)`` for the T uncached
prompt tokens it computes plus ``decode(u)`` when it decodes, u being the running
requests' KV tokens over the pool's capacity. Mixed steps pay both terms.

Output tokens are pseudo-random ids in ``[0, vocab_size)`` fixed by (prompt, seed), or by
(prompt, request id) without a seed, or by the prompt alone at temperature 0. The mock
never emits an ``eos_token_ids`` id by itself, so only ``max_tokens`` ("length") or a
``stop_token_ids`` hit ("stop", the stop token included) ends a request; ``ignore_eos``
therefore changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import xxhash

from dynamo_bus.engines.base import Engine, EngineLoad, EngineOutput, EngineRequest
from dynamo_bus.engines.block_pool import BlockPool
from dynamo_bus.errors import InvalidRequest, Overloaded, PromptTooLong
from dynamo_bus.hashing import HASH_SCHEME, sequence_hashes
from dynamo_bus.messages import Fingerprint, FinishReason

log = logging.getLogger(__name__)

_MIN_SLEEP_S = 1e-3  # asyncio cannot sleep less than this with any accuracy
_MAX_LAG_S = 2e-3    # how much oversleep later steps may win back


class Clock(Protocol):
    """Where the engine reads and spends time; an offline simulator passes a virtual one.

    ``sleep`` always yields to the event loop, and may return early for a duration below
    its resolution: the engine steps to deadlines read from ``now()``, so time not slept
    now is slept at a later step.
    """

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class AsyncioClock:
    """Real time, from the running event loop."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        # At high speedup a step lasts microseconds, far below timer resolution: yield
        # only, and let the time owed build up to a sleep that can be accurate.
        await asyncio.sleep(seconds if seconds >= _MIN_SLEEP_S else 0)


def prefill_ms(new_tokens: int) -> float:
    """Dynamo mocker default: prefill time of a batch with ``new_tokens`` uncached tokens."""
    t = float(new_tokens)
    return 4.209989e-07 * t * t + 1.518344e-02 * t + 16.50142


def decode_ms(utilization: float) -> float:
    """Dynamo mocker default: one decode step at KV utilization ``utilization`` (0..1)."""
    u = utilization
    return max(1.0, -25.74 * u * u + 54.01 * u + 5.74)


@dataclass(slots=True, eq=False)
class _Req:
    request_id: str
    tokens: list[int]            # prompt + generated tokens that need KV
    hashes: list[int]            # sequence hashes of ``tokens`` when last hashed
    outputs: list[int]           # the whole token stream this request will emit
    logprobs: list[float] | None
    stop_ids: frozenset[int]
    num_computed: int = 0        # tokens whose KV is computed
    num_in_pool: int = 0         # tokens holding a slot in the pool
    prefill_target: int = 0      # len(tokens) at the last admission; 0 before the first
    num_output: int = 0
    cached_tokens: int = 0
    running: bool = False
    finish: FinishReason | None = None
    pending: list[int] = field(default_factory=list)
    pending_logprobs: list[float] = field(default_factory=list)
    event: asyncio.Event = field(default_factory=asyncio.Event)


class MockEngine(Engine):
    """A simulated engine; see the module docstring."""

    name = "mock"

    def __init__(self, model: str, *, vocab_size: int, eos_token_ids: tuple[int, ...] = (),
                 context_length: int = 8192, block_size: int = 16, num_blocks: int = 16384,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 speedup: float = 1.0, kv_bytes_per_token: int = 23040,
                 clock: Clock | None = None) -> None:
        excluded = sorted({e for e in eos_token_ids if 0 <= e < vocab_size})
        if vocab_size - len(excluded) < 1:
            raise ValueError("vocab_size must leave at least one non-EOS token")
        if min(context_length, block_size, num_blocks, max_num_seqs,
               max_num_batched_tokens) < 1 or speedup <= 0:
            raise ValueError("sizes and speedup must be positive")
        self.model = model
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.speedup = speedup
        self.kv_bytes_per_token = kv_bytes_per_token
        self.clock: Clock = clock if clock is not None else AsyncioClock()
        self.num_preemptions = 0
        self._context_length = context_length
        self._excluded = np.asarray(excluded, dtype=np.int64)
        self._pool: BlockPool | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._requests: dict[str, _Req] = {}
        self._waiting: deque[_Req] = deque()
        self._running: dict[str, _Req] = {}  # admission order: the last is preempted first
        self._deadline = 0.0
        self._closed: str | None = None      # why new requests are refused

    # -- Engine interface -------------------------------------------------------------

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(model=self.model, block_size=self.block_size,
                           hash_scheme=HASH_SCHEME)

    @property
    def context_length(self) -> int:
        return self._context_length

    async def start(self) -> None:
        if self._closed is not None:
            raise RuntimeError(f"a stopped engine cannot start again ({self._closed})")
        if self._task is not None:
            return
        self._pool = BlockPool(self.num_blocks, self.block_size)
        self._deadline = self.clock.now()
        self._task = asyncio.create_task(self._run(), name=f"mock-engine-{self.model}")

    async def stop(self) -> None:
        if self._closed is None:
            self._closed = "engine stopped"
        for req in list(self._requests.values()):
            self._finish(req, "cancelled")
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            self._finish(req, "cancelled")

    def load(self) -> EngineLoad:
        pool = self._pool
        prefill = sum(r.prefill_target - r.num_computed for r in self._running.values()
                      if r.num_computed < r.prefill_target)
        prefill += sum(len(r.tokens) for r in self._waiting)
        return EngineLoad(active_requests=len(self._running),
                          waiting_requests=len(self._waiting),
                          active_prefill_tokens=prefill,
                          active_blocks=pool.num_active if pool else 0,
                          total_blocks=self.num_blocks)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        req = self._accept(request)
        self._requests[req.request_id] = req
        self._waiting.append(req)
        self._wakeup.set()
        first = True
        try:
            while True:
                await req.event.wait()
                req.event.clear()
                finish = req.finish
                out = EngineOutput(token_ids=req.pending, finish_reason=finish,
                                   cached_tokens=req.cached_tokens if first else 0,
                                   logprobs=req.pending_logprobs if req.logprobs else None)
                req.pending, req.pending_logprobs = [], []
                first = False
                yield out
                if finish is not None:
                    return
        finally:
            # aclose() or cancellation of the reader: the lifecycle says that aborts.
            if req.finish is None:
                self._finish(req, "cancelled")

    @property
    def _p(self) -> BlockPool:
        if self._pool is None:
            raise RuntimeError("the engine is not started")
        return self._pool

    # -- admission checks -------------------------------------------------------------

    def _accept(self, request: EngineRequest) -> _Req:
        if self._closed is not None or self._task is None:
            raise Overloaded(f"{self.name} engine is not serving: "
                             f"{self._closed or 'not started'}", code="engine_stopped")
        rid, prompt, sampling = request.request_id, request.token_ids, request.sampling
        if rid in self._requests:
            raise InvalidRequest(f"request id {rid!r} is already running", param="request_id")
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if sampling.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        arr = np.asarray(prompt)  # an object array if some id is beyond int64
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise InvalidRequest(f"token ids must be in [0, {self.vocab_size})", param="prompt")
        total = len(prompt) + sampling.max_tokens
        if len(prompt) >= self._context_length or total > self._context_length:
            raise PromptTooLong(
                f"this model's maximum context length is {self._context_length} tokens; "
                f"the request has {len(prompt)} prompt tokens and asks for "
                f"{sampling.max_tokens} more",
                param="prompt" if len(prompt) >= self._context_length else "max_tokens")
        if -(-total // self.block_size) > self.num_blocks:
            raise InvalidRequest(
                f"the request needs {-(-total // self.block_size)} KV blocks; this engine "
                f"has {self.num_blocks} in all", code="kv_cache_too_small")
        outputs, logprobs = self._token_stream(rid, arr, sampling.seed,
                                               sampling.temperature, sampling.max_tokens,
                                               sampling.logprobs is not None)
        hashes = sequence_hashes(arr, self.block_size)
        return _Req(rid, list(prompt), hashes, outputs, logprobs,
                    frozenset(sampling.stop_token_ids))

    def _token_stream(self, request_id: str, prompt: np.ndarray, seed: int | None,
                      temperature: float, n: int,
                      with_logprobs: bool) -> tuple[list[int], list[float] | None]:
        # Greedy output depends on the prompt only; sampled output on prompt and seed
        # (or the request id, so unseeded requests differ from one another).
        if temperature == 0:
            salt = 0
        elif seed is not None:
            salt = seed & 0xFFFFFFFFFFFFFFFF
        else:
            salt = xxhash.xxh3_64_intdigest(request_id.encode())
        key = xxhash.xxh3_64_intdigest(prompt.astype("<u4").tobytes(), salt)
        rng = np.random.default_rng(key)
        ids = rng.integers(0, self.vocab_size - len(self._excluded), size=n, dtype=np.int64)
        for e in self._excluded:  # sorted: shift past each EOS id in turn
            ids[ids >= e] += 1
        logprobs = (-rng.exponential(0.5, size=n)).tolist() if with_logprobs else None
        return ids.tolist(), logprobs

    # -- scheduler --------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                prefills, decodes = self._schedule()
                if not prefills and not decodes:
                    self._wakeup.clear()  # nothing can run until a request or abort comes
                    await self._wakeup.wait()
                    self._deadline = self.clock.now()  # idle time is not owed to anyone
                    continue
                await self._spend(self._step_seconds(prefills, decodes))
                self._complete(prefills, decodes)
        except Exception:
            log.exception("mock engine scheduler failed; failing every request")
            self._closed = "scheduler failed"
            for req in list(self._requests.values()):
                self._finish(req, "error")

    def _schedule(self) -> tuple[list[tuple[_Req, int]], list[_Req]]:
        budget = self.max_num_batched_tokens
        prefills: list[tuple[_Req, int]] = []
        decodes: list[_Req] = []
        for req in list(self._running.values()):
            if budget == 0:
                break
            if not req.running:  # preempted earlier in this loop
                continue
            if req.num_computed < req.prefill_target:
                n = min(req.prefill_target - req.num_computed, budget)
                prefills.append((req, n))
                budget -= n
            elif self._grow(req):
                decodes.append(req)
                budget -= 1
        while (self._waiting and budget > 0 and len(self._running) < self.max_num_seqs
               and self._admit(self._waiting[0])):
            req = self._waiting.popleft()
            n = min(req.prefill_target - req.num_computed, budget)
            prefills.append((req, n))
            budget -= n
        return prefills, decodes

    def _grow(self, req: _Req) -> bool:
        """Give the request's newest token a slot, preempting the newest requests for
        it if needed; False when ``req`` itself was preempted."""
        pool = self._p
        while not pool.may_append(req.request_id):
            victim = self._running[next(reversed(self._running))]
            self._preempt(victim)
            if victim is req:
                return False
        pool.append_token(req.request_id, req.tokens[-1])
        req.num_in_pool += 1
        return True

    def _preempt(self, req: _Req) -> None:
        self._p.free(req.request_id)
        del self._running[req.request_id]
        req.running = False
        req.num_computed = req.num_in_pool = 0
        self._waiting.appendleft(req)
        self.num_preemptions += 1

    def _admit(self, req: _Req) -> bool:
        pool = self._p
        if len(req.hashes) != len(req.tokens) // self.block_size:
            req.hashes = sequence_hashes(req.tokens, self.block_size)  # grew before preemption
        if not pool.can_allocate(pool.num_blocks_needed(len(req.tokens), req.hashes)):
            return False
        _, cached = pool.allocate(req.request_id, req.tokens, hashes=req.hashes)
        if req.prefill_target == 0:  # first admission: what the user is told was cached
            req.cached_tokens = cached
        req.num_computed = cached
        req.num_in_pool = req.prefill_target = len(req.tokens)
        req.running = True
        self._running[req.request_id] = req
        return True

    def _step_seconds(self, prefills: list[tuple[_Req, int]], decodes: list[_Req]) -> float:
        ms = prefill_ms(sum(n for _, n in prefills)) if prefills else 0.0
        if decodes:
            kv_tokens = sum(r.num_in_pool for r in self._running.values())
            ms += decode_ms(min(1.0, kv_tokens / (self.num_blocks * self.block_size)))
        return ms / 1000.0 / self.speedup

    async def _spend(self, seconds: float) -> None:
        # Step to a running deadline, not "sleep per step": scheduling overlaps the
        # simulated compute as on a GPU, short steps add up until the clock can sleep
        # them, and an oversleep is won back by the following steps.
        now = self.clock.now()
        self._deadline = max(self._deadline, now - _MAX_LAG_S) + seconds
        await self.clock.sleep(max(self._deadline - now, 0.0))

    def _complete(self, prefills: list[tuple[_Req, int]], decodes: list[_Req]) -> None:
        pool = self._p
        for req, n in prefills:
            if not req.running:  # aborted while the step ran
                continue
            req.num_computed += n
            pool.mark_computed(req.request_id, req.num_computed)
            if req.num_computed == req.prefill_target:
                self._emit(req)
        for req in decodes:
            if req.running:
                req.num_computed += 1
                self._emit(req)

    def _emit(self, req: _Req) -> None:
        i = req.num_output
        token = req.outputs[i]
        req.num_output = i + 1
        req.pending.append(token)
        if req.logprobs is not None:
            req.pending_logprobs.append(req.logprobs[i])
        if token in req.stop_ids:
            self._finish(req, "stop")
        elif req.num_output == len(req.outputs):
            self._finish(req, "length")
        else:
            req.tokens.append(token)
            req.event.set()

    def _finish(self, req: _Req, reason: FinishReason) -> None:
        """End a request wherever it is; the pool gets every block back."""
        if req.finish is not None:
            return
        if req.running:
            self._p.free(req.request_id)
            del self._running[req.request_id]
            req.running = False
        elif req in self._waiting:
            self._waiting.remove(req)
        self._requests.pop(req.request_id, None)
        req.finish = reason
        req.event.set()
        self._wakeup.set()  # freed blocks may let a stalled scheduler go on

