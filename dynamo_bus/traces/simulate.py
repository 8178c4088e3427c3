"""Offline simulation: the router's own policy code in front of simulated engines, on a
virtual clock, over a whole trace in seconds. For what-if studies: worker count, cache
size, block size, strategy and cost weights.

What is real: :class:`~dynamo_bus.routing.policy.RoutingPolicy` (the code the online router
runs), the residency index it reads, and :class:`~dynamo_bus.engines.mock.MockEngine`
(the shared continuous-batching scheduler, block pool, prefix cache and Dynamo's
mocker timing). What is simulated: time (an event loop whose clock jumps to the next
timer instead of waiting for it) and the bus (the router reads each engine's load
and residency directly; ``residency_lag`` delays the residency as a publish interval
would).

Disaggregated (``prefill_workers`` > 0): ``workers`` are decode workers and the policy
places each request as the online router does (``RoutingPolicy.place``): a prompt
whose part the chosen decode worker lacks has at least ``disagg_min_prefill_tokens``
tokens runs on a prefill worker for one token, its blocks are parked in that worker's
host tier, and the decode worker takes in the ones it lacks after their transfer time
(``transfer_bandwidth``) before it decodes; the prefix hit rate is then the prefill
worker's.

Each request gives a :class:`~dynamo_bus.traces.report.RequestRecord`, as a live replay does:
TTFT and E2E run from its arrival (trace timestamp / ``arrival_speedup``) to its first /
last token; the prefix hit rate is cached prompt tokens over all prompt tokens, as
Dynamo's replay reports its "prefix cache reused ratio".
"""

from __future__ import annotations

import asyncio
import selectors
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from dynamo_bus.bus.messages import (
    Fingerprint,
    Load,
    Registration,
    Request,
    SamplingOptions,
)
from dynamo_bus.engines.base import EngineRequest
from dynamo_bus.engines.mock import DISK_BANDWIDTH, HOST_BANDWIDTH, MockEngine
from dynamo_bus.engines.mock_peers import TRANSFER_BANDWIDTH
from dynamo_bus.errors import ConfigError
from dynamo_bus.hashing import HASH_SCHEME, sequence_hashes
from dynamo_bus.routing.policy import KvWeights, RoutingPolicy
from dynamo_bus.traces.mooncake import TraceRequest, synth_tokens
from dynamo_bus.traces.report import RequestRecord

MODEL = "sim"
VOCAB = 49152


class _JumpingSelector(selectors.DefaultSelector):
    """Never waits: when nothing is ready, moves the loop's clock to the next timer."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise RuntimeError("simulation stalled: nothing runnable and no timer pending")
        assert self.loop is not None
        self.loop.now += timeout
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time (see :class:`_JumpingSelector`); for code that
    does no I/O of its own."""

    def __init__(self) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 0.0

    def time(self) -> float:
        return self.now


class VirtualClock:
    """The engines' :class:`~dynamo_bus.engines.mock.Clock` on a virtual loop: exact."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _SimWorkers:
    """The policy's view of the simulated workers: loads read live from the engines."""

    def __init__(self, engines: dict[str, MockEngine], block_size: int,
                 disaggregated: bool = False) -> None:
        self.engines = engines
        self.regs = [Registration(worker_id=wid, model=MODEL,
                                  fingerprint=Fingerprint(MODEL, block_size, HASH_SCHEME),
                                  work_subject="", capacity=e.max_num_seqs,
                                  role=_role(wid) if disaggregated else "aggregated")
                     for wid, e in engines.items()]

    def workers(self, model: str | None = None) -> list[Registration]:
        return self.regs

    def load(self, worker_id: str) -> Load:
        el = self.engines[worker_id].load()
        return Load(worker_id=worker_id, active_requests=el.active_requests,
                    active_prefill_tokens=el.active_prefill_tokens,
                    active_blocks=el.active_blocks, total_blocks=el.total_blocks,
                    at=asyncio.get_running_loop().time())


@dataclass
class SimSettings:
    workers: int = 4
    num_blocks: int = 16384           # per worker
    block_size: int = 16
    strategy: str = "kv_aware"
    weights: KvWeights = field(default_factory=KvWeights)
    max_num_seqs: int = 256
    max_batched_tokens: int = 8192
    engine_speedup: float = 1.0
    arrival_speedup: float = 1.0
    residency_lag: float = 0.0        # seconds between an engine's change and the index
    host_blocks: int = 0              # per worker: the host tier (G2) below the pool; 0: none
    host_bandwidth: float = HOST_BANDWIDTH  # bytes/s, host tier to device
    disk_blocks: int = 0              # per worker: the disk tier (G3) below G2; 0: none
    disk_bandwidth: float = DISK_BANDWIDTH  # bytes/s, disk tier to device
    disk_admit: int = 2               # requests that must ask for a block before G3 takes it
    kv_policy: str = "lru"            # eviction in every tier
    prefill_workers: int = 0          # > 0: disaggregated, ``workers`` decode workers
    disagg_min_prefill_tokens: int = 1000  # uncached tokens worth a prefill worker
    transfer_bandwidth: float = TRANSFER_BANDWIDTH  # bytes/s, prefill host tier to decode


@dataclass
class SimResult:
    settings: SimSettings
    records: list[RequestRecord]      # in trace order; times are virtual
    wall_s: float
    preemptions: int
    gaps_ms: array[float] = field(default_factory=lambda: array("d"))  # every token's

    @property
    def token_itl_ms(self) -> array[float]:
        """The gap before every output token after a request's first, over all
        requests: Dynamo's replay reports ITL as this distribution (and the per-request
        mean, ``RequestRecord.itl_ms``, as TPOT)."""
        return self.gaps_ms

    @property
    def reuse(self) -> float:
        prompt = sum(r.prompt_tokens for r in self.records)
        return sum(r.cached_tokens for r in self.records) / prompt if prompt else 0.0

    @property
    def ttft_ms(self) -> list[float]:
        return [r.ttft_ms for r in self.records if r.ttft_ms is not None]

    @property
    def e2e_ms(self) -> list[float]:
        return [r.e2e_ms for r in self.records if r.e2e_ms is not None]

    @property
    def per_worker(self) -> dict[str, int]:
        return dict(Counter(r.worker for r in self.records))


def _role(worker_id: str) -> Literal["prefill", "decode"]:
    return "prefill" if worker_id.startswith("p") else "decode"


def _engines(s: SimSettings) -> dict[str, MockEngine]:
    clock = VirtualClock()
    if s.prefill_workers and not s.host_blocks:
        raise ConfigError("a disaggregated simulation hands KV over through the host "
                          "tiers: give --host-blocks")
    ids = ([f"p{i}" for i in range(s.prefill_workers)] + [f"d{i}" for i in range(s.workers)]
           if s.prefill_workers else [f"w{i}" for i in range(s.workers)])
    return {wid: MockEngine(MODEL, vocab_size=VOCAB, context_length=1 << 24,
                                block_size=s.block_size, num_blocks=s.num_blocks,
                                max_num_seqs=s.max_num_seqs,
                                max_num_batched_tokens=s.max_batched_tokens,
                                speedup=s.engine_speedup, clock=clock,
                                host_blocks=s.host_blocks, host_bandwidth=s.host_bandwidth,
                                disk_blocks=s.disk_blocks, disk_bandwidth=s.disk_bandwidth,
                                disk_admit_after=s.disk_admit, kv_policy=s.kv_policy,
                                transfer_bandwidth=s.transfer_bandwidth)
            for wid in ids}


@dataclass
class _Sim:
    """One simulation run: the engines, the policy in front of them, a record per request."""

    s: SimSettings
    engines: dict[str, MockEngine]
    policy: RoutingPolicy
    records: list[RequestRecord]
    gaps_ms: array[float] = field(default_factory=lambda: array("d"))

    def sync_residency(self) -> None:
        for wid, e in self.engines.items():
            for h, tier in e.residency_changes().items():
                self.policy.index.apply(wid, h, tier)

    async def lagged_residency(self) -> None:
        while True:
            await asyncio.sleep(self.s.residency_lag)
            self.sync_residency()

    async def run(self, i: int, req: TraceRequest, arrival: float) -> None:
        """Route request ``i``, arriving at ``arrival``, and run it to its last token."""
        loop = asyncio.get_running_loop()
        tokens = synth_tokens(req, VOCAB)
        hashes = sequence_hashes(tokens, self.s.block_size)
        rid = f"r{i}"
        msg = Request(request_id=rid, model=MODEL, token_ids=tokens.tolist(), reply_to="")
        if self.s.residency_lag == 0:
            self.sync_residency()
        decision = self.policy.place(msg, self.policy.candidates(msg), hashes,
                                     min_prefill_tokens=self.s.disagg_min_prefill_tokens)
        self.policy.sent(msg, decision)
        wid = decision.worker.worker_id
        sampling = SamplingOptions(max_tokens=req.output_length, temperature=0.0,
                                   ignore_eos=True)
        rec = self.records[i] = RequestRecord(index=i, arrival_s=arrival, start_s=arrival,
                                              prompt_tokens=len(tokens), worker=wid)
        first = last = 0.0
        handed = decision.prefill is not None
        if handed:
            assert decision.prefill is not None
            rec.cached_tokens = await self.hand_over(decision.prefill.worker.worker_id, wid,
                                                     msg, hashes)
        async for out in self.engines[wid].generate(EngineRequest(rid, msg.token_ids,
                                                                  sampling)):
            now = loop.time()
            if out.token_ids and not rec.output_tokens:
                first = now
                if not handed:
                    rec.cached_tokens = out.cached_tokens
            elif out.token_ids:
                gap = (now - last) * 1000 / len(out.token_ids)
                self.gaps_ms.extend([gap] * len(out.token_ids))
            rec.output_tokens += len(out.token_ids)
            last = now
        rec.ttft_ms = (first - arrival) * 1000
        rec.e2e_ms = (last - arrival) * 1000
        if rec.output_tokens > 1:
            rec.itl_ms = (last - first) * 1000 / (rec.output_tokens - 1)

    async def hand_over(self, prefill_id: str, decode_id: str, msg: Request,
                        hashes: list[int]) -> int:
        """Prefill ``msg`` on one worker, park its blocks and have the decode worker
        take in those it lacks; returns the prompt tokens the prefill found cached."""
        prefill, decode = self.engines[prefill_id], self.engines[decode_id]
        cached = 0
        one = SamplingOptions(max_tokens=1, temperature=0.0, ignore_eos=True)
        async for out in prefill.generate(EngineRequest(msg.request_id + ".prefill",
                                                        msg.token_ids, one)):
            if out.token_ids:
                cached = out.cached_tokens
        held = await prefill.park_host_blocks(hashes)
        await decode.receive_blocks(hashes[:held])
        return cached

    async def run_all(self, trace: list[TraceRequest]) -> None:
        """Start each request at its arrival time; wait for them all."""
        loop = asyncio.get_running_loop()
        t0 = trace[0].timestamp if trace else 0.0
        tasks = []
        for i, req in enumerate(trace):
            arrival = (req.timestamp - t0) / 1000 / self.s.arrival_speedup
            if arrival > loop.time():
                await asyncio.sleep(arrival - loop.time())
            tasks.append(asyncio.create_task(self.run(i, req, arrival)))
        await asyncio.gather(*tasks)


async def _simulate(trace: list[TraceRequest], s: SimSettings) -> SimResult:
    engines = _engines(s)
    for e in engines.values():
        await e.start()
    policy = RoutingPolicy(_SimWorkers(engines, s.block_size, s.prefill_workers > 0),
                           s.strategy,
                           block_size=s.block_size, weights=s.weights)
    sim = _Sim(s, engines, policy, [None] * len(trace))  # type: ignore[list-item]
    lag_task = asyncio.create_task(sim.lagged_residency()) if s.residency_lag > 0 else None
    await sim.run_all(trace)
    if lag_task is not None:
        lag_task.cancel()
    for e in engines.values():
        await e.stop()
    return SimResult(settings=s, records=sim.records, wall_s=0.0,
                     preemptions=sum(e.num_preemptions for e in engines.values()),
                     gaps_ms=sim.gaps_ms)


def simulate(trace: list[TraceRequest], settings: SimSettings) -> SimResult:
    """Replay ``trace`` through the policy and simulated engines on a virtual clock."""
    loop = VirtualTimeLoop()
    started = time.perf_counter()
    try:
        result = loop.run_until_complete(_simulate(trace, settings))
    finally:
        loop.close()
    result.wall_s = time.perf_counter() - started
    return result
