"""The simulated engine: real scheduling, real block pool and real hashes, fake compute.

``MockEngine`` runs Dynamo's mocker timing model on the shared continuous-batching
scheduler (:mod:`dynamo_bus.engines.scheduler`), so routers, workers and the bus can be
exercised at scale without a model.

A step lasts, in milliseconds divided by ``speedup``, ``prefill(T)`` for the T uncached
prompt tokens it computes plus ``decode(u)`` when it decodes, u being the decoding
requests' context lengths over the pool's capacity in tokens (as Dynamo's mocker).
Mixed steps pay both terms.

With a host tier (G2) and a disk tier (G3) the mock keeps their bookkeeping (which
blocks each holds) but no KV data: copying a prefix back takes ``blocks x block bytes /
bandwidth`` of the tier it comes from, divided by ``speedup``, for the request that
waits for it (other requests' steps go on), and copying evicted blocks out costs no
step time (a copy engine does it on a GPU; disk writes run beside the engine).

As a prefill or decode worker the mock hands KV to another through its host tier,
in bookkeeping and simulated transfer time (:mod:`dynamo_bus.engines.mock_peers`).

Output tokens are pseudo-random ids in ``[0, vocab_size)`` fixed by (prompt, seed), or by
(prompt, request id) without a seed, or by the prompt alone at temperature 0. The mock
never emits an ``eos_token_ids`` id by itself, so only ``max_tokens`` ("length") or a
``stop_token_ids`` hit ("stop", the stop token included) ends a request; ``ignore_eos``
therefore changes nothing. Log-probabilities are made up too: the chosen token is
always the most likely of its ``top_logprobs``.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import numpy as np
import xxhash

from dynamo_bus.engines.base import EngineRequest
from dynamo_bus.engines.mock_peers import TRANSFER_BANDWIDTH, SimulatedPeers
from dynamo_bus.engines.scheduler import BatchingEngine
from dynamo_bus.engines.sequence import Sampled, Seq

_MIN_SLEEP_S = 1e-3  # asyncio cannot sleep less than this with any accuracy
# Host tier -> device copies: pinned host to device memory measured on an H200 (DESIGN.md).
HOST_BANDWIDTH = 51 * 2**30
# Disk tier -> host reads through NIXL's POSIX backend with O_DIRECT, measured here.
DISK_BANDWIDTH = int(1.1 * 2**30)
KV_BYTES_PER_TOKEN = 23040  # SmolLM2-135M in bfloat16 (DESIGN.md)
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


class MockEngine(SimulatedPeers, BatchingEngine):
    """A simulated engine; see the module docstring."""

    name = "mock"

    def __init__(self, model: str, *, vocab_size: int, eos_token_ids: tuple[int, ...] = (),
                 context_length: int = 8192, block_size: int = 16, num_blocks: int = 16384,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 speedup: float = 1.0, kv_bytes_per_token: int = KV_BYTES_PER_TOKEN,
                 clock: Clock | None = None, host_blocks: int = 0,
                 host_bandwidth: float = HOST_BANDWIDTH, kv_policy: str = "lru",
                 kv_offload: str = "evict", disk_blocks: int = 0,
                 disk_bandwidth: float = DISK_BANDWIDTH, disk_admit_after: int = 2,
                 transfer_bandwidth: float = TRANSFER_BANDWIDTH) -> None:
        excluded = sorted({e for e in eos_token_ids if 0 <= e < vocab_size})
        if vocab_size - len(excluded) < 1:
            raise ValueError("vocab_size must leave at least one non-EOS token")
        if speedup <= 0:
            raise ValueError("speedup must be positive")
        super().__init__(model, vocab_size=vocab_size, eos_token_ids=eos_token_ids,
                         context_length=context_length, block_size=block_size,
                         num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens,
                         host_blocks=host_blocks, kv_policy=kv_policy, kv_offload=kv_offload,
                         disk_blocks=disk_blocks, disk_admit_after=disk_admit_after)
        self.speedup = speedup
        self.host_bandwidth = host_bandwidth
        self.disk_bandwidth = disk_bandwidth
        self.transfer_bandwidth = transfer_bandwidth
        self.kv_bytes_per_token = kv_bytes_per_token
        self.clock: Clock = clock if clock is not None else AsyncioClock()
        self._excluded = np.asarray(excluded, dtype=np.int64)
        self._deadline = 0.0

    async def _load(self) -> None:
        self._deadline = self.clock.now()

    def _on_idle_wakeup(self) -> None:
        self._deadline = self.clock.now()  # idle time is not owed to anyone

    def _prepare(self, seq: Seq, request: EngineRequest) -> None:
        s = request.sampling
        seq.state = self._token_stream(seq.request_id, np.asarray(request.token_ids), s.seed,
                                       s.temperature, s.max_tokens, s.logprobs)

    def _token_stream(self, request_id: str, prompt: np.ndarray, seed: int | None,
                      temperature: float, n: int, top_k: int | None) -> list[Sampled]:
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
        if top_k is None:
            return [Sampled(t) for t in ids.tolist()]
        logprobs = (-rng.exponential(0.5, size=n)).tolist()
        return [Sampled(t, lp, [((t + 7919 * j) % self.vocab_size, lp - 0.5 * j)
                               for j in range(top_k)])
                for t, lp in zip(ids.tolist(), logprobs, strict=True)]

    async def _execute(self, prefills: list[tuple[Seq, int]],
                       decodes: list[Seq]) -> list[Sampled | None]:
        await self._spend(self._step_seconds(prefills, decodes))
        out: list[Sampled | None] = [
            seq.state[seq.num_output] if seq.num_computed + n == seq.prefill_target else None
            for seq, n in prefills]
        out += [seq.state[seq.num_output] for seq in decodes]
        return out

    async def _onboard_blocks(self, block_ids: list[int], slots: list[int]) -> None:
        nbytes = len(block_ids) * self.block_size * self.kv_bytes_per_token
        await self.clock.sleep(nbytes / self.host_bandwidth / self.speedup)

    async def _onboard_disk(self, block_ids: list[int], hashes: list[int]) -> int:
        nbytes = len(block_ids) * self.block_size * self.kv_bytes_per_token
        await self.clock.sleep(nbytes / self.disk_bandwidth / self.speedup)
        return len(block_ids)

    def _step_seconds(self, prefills: list[tuple[Seq, int]], decodes: list[Seq]) -> float:
        ms = prefill_ms(sum(n for _, n in prefills)) if prefills else 0.0
        if decodes:
            kv_tokens = sum(s.num_in_pool for s in decodes)
            ms += decode_ms(min(1.0, kv_tokens / (self.num_blocks * self.block_size)))
        return ms / 1000.0 / self.speedup

    async def _spend(self, seconds: float) -> None:
        # Step to a running deadline, not "sleep per step": scheduling overlaps the
        # simulated compute as on a GPU, short steps add up until the clock can sleep
        # them, and an oversleep is won back by the following steps.
        now = self.clock.now()
        self._deadline = max(self._deadline, now - _MAX_LAG_S) + seconds
        await self.clock.sleep(max(self._deadline - now, 0.0))
