"""Continuous batching over a paged KV block pool, shared by the engines that compute
tokens themselves (``reference``) or pretend to (``mock``).

:class:`BatchingEngine` owns one scheduler task (started in ``start()``, cancelled in
``stop()``) that runs steps in the style of vLLM v1:

* running requests are served first, oldest first: one token each for those decoding,
  a chunk of the prompt for those still prefilling (chunked prefill under
  ``max_num_batched_tokens``);
* waiting requests are then admitted in arrival order while ``max_num_seqs`` and the
  pool allow; admission reuses cached prefix blocks (prefix caching keyed by the chained
  block hashes of :mod:`dynamo_bus.hashing`);
* when a decoding request needs a block and none is free, the newest running request is
  preempted (its blocks freed; it re-prefills later, usually from the prefix cache);
* with a host tier (G2, :mod:`dynamo_bus.kvbm`), the blocks a step's planning evicted
  are copied there before the step runs, and an admitted request whose prefix goes on
  in G2 (and then in the disk tier, G3) past what the pool holds waits, out of the
  steps, while those blocks are copied back; then it prefills only the rest.

A subclass only says how a step runs (:meth:`BatchingEngine._execute`). Requests join
and leave between steps; what a request is to the scheduler lives in
:mod:`dynamo_bus.engines.sequence`, the pool and the tiers in
:mod:`dynamo_bus.engines.paged_kv`. The blocks of a request aborted once its step is
planned are freed only after that step ran: a step's KV writes never land in another
request's block, and a block the step completes holds its KV before anyone finds it.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator

from dynamo_bus.bus.messages import Fingerprint, FinishReason
from dynamo_bus.engines.base import EngineLoad, EngineOutput, EngineRequest
from dynamo_bus.engines.block_pool import BlockPool
from dynamo_bus.engines.paged_kv import PagedKVEngine
from dynamo_bus.engines.sequence import Sampled, Seq, new_seq
from dynamo_bus.errors import InvalidRequest, Overloaded
from dynamo_bus.hashing import HASH_SCHEME, sequence_hashes

log = logging.getLogger(__name__)


class BatchingEngine(PagedKVEngine):
    """An engine whose steps the shared scheduler plans; see the module docstring."""

    def __init__(self, model: str, *, vocab_size: int, eos_token_ids: tuple[int, ...] = (),
                 context_length: int = 8192, block_size: int = 16, num_blocks: int = 16384,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 host_blocks: int = 0, kv_policy: str = "lru",
                 kv_offload: str = "evict", disk_blocks: int = 0, disk_dir: str = "",
                 disk_admit_after: int = 2) -> None:
        if min(context_length, block_size, num_blocks, max_num_seqs,
               max_num_batched_tokens, vocab_size) < 1:
            raise ValueError("sizes must be positive")
        super().__init__(host_blocks=host_blocks, kv_policy=kv_policy, kv_offload=kv_offload,
                         disk_blocks=disk_blocks, disk_dir=disk_dir,
                         disk_admit_after=disk_admit_after)
        self.model = model
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_preemptions = 0
        self._context_length = context_length
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._requests: dict[str, Seq] = {}
        self._waiting: deque[Seq] = deque()
        self._running: dict[str, Seq] = {}  # admission order: the last is preempted first
        self._closed: str | None = None     # why new requests are refused
        self._onboards: set[asyncio.Future[None]] = set()  # copies in from G2 and G3
        self._copied_out: asyncio.Future[None] | None = None  # this planning's evictions saved

    # -- what a subclass provides -----------------------------------------------------

    async def _load(self) -> None:  # weights, device memory: once, in start()
        pass

    async def _unload(self) -> None:  # what _load took: once, in stop()
        pass

    def _prepare(self, seq: Seq, request: EngineRequest) -> None:  # set seq.state
        pass

    def _release(self, seq: Seq) -> None:  # a request finished: drop seq.state
        pass

    def _on_idle_wakeup(self) -> None:  # the scheduler had nothing to run and now has
        pass

    @abc.abstractmethod
    async def _execute(self, prefills: list[tuple[Seq, int]],
                       decodes: list[Seq]) -> list[Sampled | None]:
        """Run one step: the next ``n`` prompt tokens of each prefill, the last token of
        each decode. Returns, aligned with ``prefills + decodes``, the next token of
        every sequence whose prompt is now complete (all decodes, and prefills whose
        chunk ends the prompt) and ``None`` for the other prefill chunks. The sequences'
        blocks stay theirs until the step ends, even if they are aborted meanwhile."""

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
        await self._load()
        await self._start_tiers(BlockPool(self.num_blocks, self.block_size))
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-engine-{self.model}")

    async def stop(self) -> None:
        if self._closed is None:
            self._closed = "engine stopped"
        for seq in list(self._requests.values()):
            self._finish(seq, "cancelled")
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})
        self._step_ran()  # no step runs any more
        if self._copied_out is not None and not self._copied_out.done():
            self._copied_out.set_result(None)  # copies not begun see _closed and skip
        await self._stop_tiers(self._onboards)
        if task is not None:
            await self._unload()

    async def abort(self, request_id: str) -> None:
        if (seq := self._requests.get(request_id)) is not None:
            self._finish(seq, "cancelled")

    def load(self) -> EngineLoad:
        pool = self._pool
        prefill = sum(s.prefill_target - s.num_computed for s in self._running.values()
                      if s.prefilling)
        prefill += sum(len(s.tokens) for s in self._waiting)
        tiers, capacity = self._tier_usage()
        return EngineLoad(active_requests=len(self._running),
                          waiting_requests=len(self._waiting),
                          active_prefill_tokens=prefill,
                          active_blocks=pool.num_active if pool else 0,
                          total_blocks=self.num_blocks, tier_blocks=tiers,
                          tier_capacity=capacity, tier_moves=self._tier_moves())

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        seq = self._accept(request)
        self._requests[seq.request_id] = seq
        self._waiting.append(seq)
        self._wakeup.set()
        with_lp = request.sampling.logprobs is not None
        first = True
        try:
            while True:
                await seq.event.wait()
                seq.event.clear()
                finish = seq.finish
                out = EngineOutput(token_ids=seq.pending, finish_reason=finish,
                                   cached_tokens=seq.cached_tokens if first else 0,
                                   logprobs=seq.pending_logprobs if with_lp else None,
                                   top_logprobs=seq.pending_top if with_lp else None)
                seq.pending, seq.pending_logprobs, seq.pending_top = [], [], []
                first = False
                yield out
                if finish is not None:
                    return
        finally:
            # aclose() or cancellation of the reader: the lifecycle says that aborts.
            if seq.finish is None:
                self._finish(seq, "cancelled")

    def _accept(self, request: EngineRequest) -> Seq:  # the checks before admission
        if self._closed is not None or self._task is None:
            raise Overloaded(f"{self.name} engine is not serving: "
                             f"{self._closed or 'not started'}", code="engine_stopped")
        if request.request_id in self._requests:
            raise InvalidRequest(f"request id {request.request_id!r} is already running",
                                 param="request_id")
        seq = new_seq(request, vocab_size=self.vocab_size, context_length=self._context_length,
                      block_size=self.block_size, num_blocks=self.num_blocks,
                      eos_token_ids=self.eos_token_ids)
        self._prepare(seq, request)
        return seq

    # -- scheduler --------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                prefills, decodes = self._schedule()
                self._planned = {s.request_id for s in decodes}
                self._planned.update(s.request_id for s, _ in prefills)
                if self.pool.has_evicted:
                    async with self._step_lock:
                        # What planning evicted goes to the host tier before anything
                        # writes its blocks: this step, or a copy in it began.
                        await self._offload()
                if self._copied_out is not None:
                    self._copied_out.set_result(None)
                    self._copied_out = None
                if not prefills and not decodes:
                    self._wakeup.clear()  # nothing can run until a request or abort comes
                    await self._wakeup.wait()
                    self._on_idle_wakeup()
                    continue
                async with self._step_lock:
                    results = await self._execute(prefills, decodes)
                    self._complete(prefills, decodes, results)
                    await self._write_through()
        except Exception:
            log.exception("%s engine scheduler failed; failing every request", self.name)
            self._closed = "scheduler failed"
            for seq in list(self._requests.values()):
                self._finish(seq, "error")

    def _schedule(self) -> tuple[list[tuple[Seq, int]], list[Seq]]:
        budget = self.max_num_batched_tokens
        prefills: list[tuple[Seq, int]] = []
        decodes: list[Seq] = []
        for seq in list(self._running.values()):
            if budget == 0:
                break
            if not seq.running or seq.onboarding is not None:  # preempted; or waits for KV
                continue
            if seq.prefilling:
                n = min(seq.prefill_target - seq.num_computed, budget)
                prefills.append((seq, n))
                budget -= n
            elif self._grow(seq):
                decodes.append(seq)
                budget -= 1
        while (self._waiting and budget > 0 and len(self._running) < self.max_num_seqs
               and self._admit(self._waiting[0])):
            seq = self._waiting.popleft()
            if seq.onboarding is not None:
                continue  # runs once its prefix is copied in from the host tier
            n = min(seq.prefill_target - seq.num_computed, budget)
            prefills.append((seq, n))
            budget -= n
        return prefills, decodes

    def _grow(self, seq: Seq) -> bool:
        """Give the sequence's newest token a slot, preempting the newest requests for
        it if needed; False when ``seq`` itself was preempted."""
        pool = self.pool
        while not pool.may_append(seq.request_id):
            # The newest request, but not one whose blocks are being copied into.
            victim = next(s for s in reversed(self._running.values()) if s.onboarding is None)
            self._preempt(victim)
            if victim is seq:
                return False
        pool.append_token(seq.request_id, seq.tokens[-1])
        seq.num_in_pool += 1
        return True

    def _preempt(self, seq: Seq) -> None:
        self.pool.free(seq.request_id)
        del self._running[seq.request_id]
        seq.running = False
        seq.num_computed = seq.num_in_pool = 0
        self._waiting.appendleft(seq)
        self.num_preemptions += 1

    def _admit(self, seq: Seq) -> bool:
        pool = self.pool
        if len(seq.hashes) != len(seq.tokens) // self.block_size:
            seq.hashes = sequence_hashes(seq.tokens, self.block_size)  # grew before preemption
        if not pool.can_allocate(pool.num_blocks_needed(len(seq.tokens), seq.hashes)):
            return False
        block_ids, cached = pool.allocate(seq.request_id, seq.tokens, hashes=seq.hashes)
        first = cached // self.block_size
        last = (len(seq.tokens) - 1) // self.block_size  # the last token is always computed
        host = disk = 0
        if self.host is not None:  # the prefix may go on in the host tier, then on disk
            host = self.host.prefix(seq.hashes[first:last])
        if self.disk is not None:
            self.disk.note_seen(seq.hashes, first=seq.prefill_target == 0)
            disk = self.disk.prefix(seq.hashes[first + host:last])
        if seq.prefill_target == 0:  # first admission: what the user is told was cached
            seq.cached_tokens = cached + (host + disk) * self.block_size
        seq.num_computed = cached
        seq.num_in_pool = seq.prefill_target = len(seq.tokens)
        seq.running = True
        self._running[seq.request_id] = seq
        if host or disk:
            self._begin_onboard(seq, block_ids[first:first + host + disk],
                                seq.hashes[first:first + host],
                                seq.hashes[first + host:first + host + disk])
        return True

    def _begin_onboard(self, seq: Seq, block_ids: list[int], from_host: list[int],
                       from_disk: list[int]) -> None:
        """Copy the prefix blocks ``from_host`` then ``from_disk`` into ``block_ids``
        while the other requests' steps go on; ``seq`` runs when they are in."""
        host, disk = self.host, self.disk
        assert host is not None
        slots = host.pin(from_host)
        if disk is not None:
            disk.pin(from_disk)  # kept from eviction until read, as the host's slots
        if self._copied_out is None:  # set once this planning's evictions are saved
            self._copied_out = asyncio.get_running_loop().create_future()
        saved = self._copied_out

        async def onboard() -> None:
            done = 0
            try:
                await saved  # the blocks this planning evicted are in the host tier
                if self._closed is None:
                    done = await self._onboard(block_ids, slots, from_disk)
            finally:
                host.unpin(from_host)
                if disk is not None:
                    disk.unpin(from_disk)
                seq.onboarding = None
            if not seq.running:  # finished (aborted) meanwhile: its blocks are free now
                self.pool.free(seq.request_id)
                return
            if done:
                seq.num_computed += done * self.block_size
                self.pool.mark_computed(seq.request_id, seq.num_computed)
            if done < len(block_ids):
                seq.cached_tokens = min(seq.cached_tokens, seq.num_computed)
            self._wakeup.set()

        seq.onboarding = asyncio.ensure_future(onboard())
        self._onboards.add(seq.onboarding)
        seq.onboarding.add_done_callback(self._onboards.discard)

    def _complete(self, prefills: list[tuple[Seq, int]], decodes: list[Seq],
                  results: list[Sampled | None]) -> None:
        pool = self.pool
        for (seq, n), sampled in zip(prefills, results, strict=False):
            if not seq.running:  # aborted while the step ran
                continue
            seq.num_computed += n
            pool.mark_computed(seq.request_id, seq.num_computed)
            if seq.num_computed == seq.prefill_target:
                if sampled is None:
                    raise RuntimeError(f"{self.name}: no token for a completed prefill")
                self._emit(seq, sampled)
        for seq, sampled in zip(decodes, results[len(prefills):], strict=True):
            if seq.running:
                seq.num_computed += 1
                if sampled is None:
                    raise RuntimeError(f"{self.name}: no token for a decode")
                self._emit(seq, sampled)
        self._step_ran()

    def _emit(self, seq: Seq, sampled: Sampled) -> None:
        token = sampled.token
        seq.num_output += 1
        seq.pending.append(token)
        if seq.sampling.logprobs is not None:
            seq.pending_logprobs.append(sampled.logprob if sampled.logprob is not None
                                        else 0.0)
            seq.pending_top.append(sampled.top or [])
        if token in seq.stop_ids:
            self._finish(seq, "stop")
        elif seq.num_output == seq.sampling.max_tokens:
            self._finish(seq, "length")
        else:
            seq.tokens.append(token)
            if seq.stream:
                seq.event.set()

    def _finish(self, seq: Seq, reason: FinishReason) -> None:
        """End a request wherever it is; the pool gets every block back."""
        if seq.finish is not None:
            return
        if seq.running:
            if seq.onboarding is None:  # else the copy under way frees them when done
                self._free_blocks(seq.request_id)
            del self._running[seq.request_id]
            seq.running = False
        elif seq in self._waiting:
            self._waiting.remove(seq)
        self._requests.pop(seq.request_id, None)
        seq.finish = reason
        self._release(seq)
        seq.event.set()
        self._wakeup.set()  # freed blocks may let a stalled scheduler go on
