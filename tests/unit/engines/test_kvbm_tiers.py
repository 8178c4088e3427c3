"""The host tier under the simulated engine's pool: offload on eviction, onboarding a
prefix instead of recomputing it, tiers in the residency, and the pool's invariants
under random load with aborts."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import msgspec
import pytest
import torch

from dynamo_bus.bus.messages import SamplingOptions
from dynamo_bus.engines.base import EngineOutput, EngineRequest
from dynamo_bus.engines.mock import MockEngine
from dynamo_bus.engines.scheduler import BatchingEngine
from dynamo_bus.engines.sequence import Sampled, Seq
from dynamo_bus.hashing import sequence_hashes
from dynamo_bus.traces.simulate import VirtualClock, VirtualTimeLoop
from tests.unit.engines.test_mock_engine import FakeClock

BS = 16
TOKEN_BYTES = 1024                     # a block is 16 KiB


def make(clock: FakeClock | VirtualClock, *, host: bool = True, blocks: int = 8,
         bandwidth: float = 2**20) -> MockEngine:
    return MockEngine("m", vocab_size=32_000, clock=clock, num_blocks=blocks, block_size=BS,
                      kv_bytes_per_token=TOKEN_BYTES, host_blocks=32 if host else 0,
                      host_bandwidth=bandwidth)


def req(rid: str, tokens: list[int], n: int = 4) -> EngineRequest:
    return EngineRequest(rid, tokens, SamplingOptions(max_tokens=n, temperature=0))


def prompt(seed: int, n: int = 96) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 30_000) for _ in range(n)]


async def run(engine: MockEngine, r: EngineRequest) -> list[EngineOutput]:
    return [o async for o in engine.generate(r)]


async def test_an_evicted_prefix_comes_back_from_the_host_tier() -> None:
    outs = {}
    for host in (False, True):
        eng = make(FakeClock(), host=host)
        await eng.start()
        try:
            first = await run(eng, req("a", prompt(1)))
            await run(eng, req("b", prompt(2)))  # takes the pool: a's blocks evicted
            again = await run(eng, req("a2", prompt(1)))
        finally:
            await eng.stop()
        assert [t for o in again for t in o.token_ids] == [t for o in first for t in o.token_ids]
        outs[host] = again[0].cached_tokens
    # 96 tokens: at most 5 blocks are reused (one token is always computed); without
    # the host tier only what b left of a in the pool.
    assert outs[True] == 5 * BS and outs[False] < outs[True]


async def test_residency_names_each_blocks_fastest_tier() -> None:
    eng = make(FakeClock())
    await eng.start()
    view: dict[int, str] = {}  # what a router following the changes holds

    def follow() -> dict[int, str | None]:
        changes = eng.residency_changes()
        for h, tier in changes.items():
            if tier is None:
                view.pop(h, None)
            else:
                view[h] = tier
        return changes

    try:
        a = sequence_hashes(prompt(1), BS)
        follow()
        await run(eng, req("a", prompt(1)))
        follow()
        assert {view.get(h) for h in a} == {"device"}
        await run(eng, req("b", prompt(2)))
        moved = follow()
        assert moved and {moved[h] for h in a if h in moved} == {"host"}  # moved, not gone
        assert {view[h] for h in a} == {"device", "host"}
        await run(eng, req("a2", prompt(1)))
        follow()
        assert [view[h] for h in a[:5]] == ["device"] * 5
        # Exactly what the engine holds, tier by tier.
        host = eng.host
        assert host is not None
        held = set(eng.pool._by_hash) | set(host._slot)
        assert view == {h: "device" if eng.pool.holds(h) else "host" for h in held}
    finally:
        await eng.stop()


def test_onboarding_waits_for_the_copy_while_other_requests_step() -> None:
    clock = VirtualClock()
    eng = make(clock, blocks=16, bandwidth=2**19)  # 16 KiB blocks at 512 KiB/s: 31 ms each

    async def body() -> tuple[int, float, float, list[float], int]:
        await eng.start()
        try:
            a = sequence_hashes(prompt(1), BS)[:5]
            for i in (1, 2, 3):  # a's blocks leave the pool for the host tier
                await run(eng, req(f"p{i}", prompt(i)))
            in_pool = len(eng.pool.lookup(a))
            times: list[float] = []

            async def other() -> None:
                async for _ in eng.generate(req("d", prompt(4, 20), n=100)):
                    times.append(clock.now())

            task = asyncio.ensure_future(other())
            await asyncio.sleep(0.05)
            start = clock.now()
            outs = await run(eng, req("a2", prompt(1)))
            first_at = clock.now()
            await task
            return outs[0].cached_tokens, start, first_at, times, in_pool
        finally:
            await eng.stop()

    loop = VirtualTimeLoop()
    try:
        cached, start, first_at, times, in_pool = loop.run_until_complete(body())
    finally:
        loop.close()
    copy_s = (5 - in_pool) * BS * TOKEN_BYTES / 2**19
    assert in_pool < 5 and cached == 5 * BS
    assert first_at - start >= copy_s  # its first token waited for the copy
    # The other request kept decoding while the copy ran.
    assert sum(start < t < start + copy_s for t in times) >= 5


async def test_pool_and_tier_stay_consistent_under_random_load_and_aborts() -> None:
    clock = FakeClock()
    eng = make(clock, blocks=24, bandwidth=2**24)
    await eng.start()
    rng = random.Random(11)
    prefixes = [prompt(100 + i, 64) for i in range(6)]
    expect: dict[tuple[int, ...], list[int]] = {}

    async def one(i: int) -> None:
        tokens = rng.choice(prefixes) + prompt(i, rng.randrange(1, 40))
        r = req(f"r{i}", tokens, n=rng.randrange(1, 12))
        got: list[int] = []
        gen = eng.generate(r)
        try:
            async for o in gen:
                got += o.token_ids
                assert o.cached_tokens <= len(tokens) - 1
                if rng.random() < 0.05:
                    await eng.abort(r.request_id)
        finally:
            await gen.aclose()
        if len(got) == r.sampling.max_tokens:  # finished: same prompt, same tokens
            assert expect.setdefault(tuple(tokens), got) == got

    try:
        for wave in range(8):
            await asyncio.gather(*(one(wave * 100 + i) for i in range(12)))
            for _ in range(2000):  # an aborted request's blocks go once its step ran
                if not eng._planned:
                    break
                await asyncio.sleep(0.001)
            pool, host = eng.pool, eng.host
            assert host is not None
            assert pool.num_active == 0 and not host._pinned
            assert len(host) <= host.capacity
            assert len(set(host._slot.values())) == len(host._slot)
            assert sorted([*host._slot.values(), *host._free]) == list(range(host.capacity))
    finally:
        await eng.stop()
    assert eng.host.stored > 0 and eng.host.onboarded > 0


async def test_write_through_copies_blocks_once_computed_and_eviction_costs_nothing() -> None:
    eng = MockEngine("m", vocab_size=32_000, clock=FakeClock(), num_blocks=8, block_size=BS,
                     kv_bytes_per_token=TOKEN_BYTES, host_blocks=32, kv_offload="write-through")
    await eng.start()
    try:
        a = sequence_hashes(prompt(1), BS)
        eng.residency_changes()
        await run(eng, req("a", prompt(1)))
        host = eng.host
        assert host is not None
        assert all(h in host for h in a)                      # copied as soon as computed
        changes = eng.residency_changes()
        assert {changes[h] for h in a} == {"device"}          # the fastest tier
        stored = host.stored
        await run(eng, req("b", prompt(2)))                   # evicts a's blocks from G1
        b = sequence_hashes(prompt(2), BS)
        assert host.stored == stored + len(b)                 # b's own, nothing for a
        again = await run(eng, req("a2", prompt(1)))
        assert again[0].cached_tokens == 5 * BS
    finally:
        await eng.stop()


class FakeKVEngine(BatchingEngine):
    """A fake engine behind the BatchingEngine seam whose KV is one number per block:
    the block's own hash, written when a step computes it. Any block that reaches the
    host tier holding another block's number was overwritten before it was saved."""

    name = "fake-kv"

    async def _load(self) -> None:
        self.kv = torch.zeros(self.num_blocks, 1, dtype=torch.float64)

    def _host_block_shape(self) -> tuple[tuple[int, ...], object]:
        return (1,), torch.float64

    def _read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        return self.kv[torch.tensor(block_ids)].clone()

    def _write_blocks(self, block_ids: list[int], data: object) -> None:
        self.kv[torch.tensor(block_ids)] = torch.as_tensor(data, dtype=torch.float64)

    async def _execute(self, prefills: list[tuple[Seq, int]],
                       decodes: list[Seq]) -> list[Sampled | None]:
        out: list[Sampled | None] = []
        for seq, n in prefills:
            table = self.pool.block_table(seq.request_id)
            end = seq.num_computed + n
            for b in range(seq.num_computed // BS, end // BS):
                self.kv[table[b]] = float(seq.hashes[b] % (1 << 40))
            out.append(Sampled(1) if end == seq.prefill_target else None)
        for seq in decodes:  # a decode token that fills its block completes that block
            pos = seq.num_computed
            if (pos + 1) % BS == 0:
                block = self.pool.block_table(seq.request_id)[pos // BS]
                self.kv[block] = float(self.pool._blocks[block].hash % (1 << 40))
        await asyncio.sleep(0)
        return out + [Sampled(1) for _ in decodes]


async def test_evicted_blocks_reach_the_host_tier_before_onboarding_reuses_them() -> None:
    eng = FakeKVEngine("m", vocab_size=32_000, block_size=BS, num_blocks=8, host_blocks=32)
    await eng.start()
    try:
        for rid, seed in (("a", 1), ("b", 2), ("a2", 1), ("c", 3)):
            # a2's onboarding takes blocks whose old contents (b's) must be saved first.
            await run(eng, req(rid, prompt(seed, 97), n=1))
        host = eng.host
        assert host is not None and host.onboarded > 0
        for h, slot in host._slot.items():
            assert float(host.data[slot, 0]) == float(h % (1 << 40))
        assert eng.pool.lookup(sequence_hashes(prompt(3, 97), BS)[:1])  # c in the pool
    finally:
        await eng.stop()


async def test_another_agent_reads_host_tier_blocks_over_nixl(ucx_loopback: None) -> None:
    """The host tier registered with NIXL (UCX): a second agent, given the engine's
    agent metadata and the blocks' descriptors, reads each block's own KV."""
    from dynamo_bus.kvbm.nixl import run_transfer, ucx_agent

    eng = FakeKVEngine("m", vocab_size=32_000, block_size=BS, num_blocks=8, host_blocks=32)
    await eng.start()
    try:
        for rid, seed in (("a", 1), ("b", 2)):  # b's blocks push a's to the host tier
            await run(eng, req(rid, prompt(seed, 97), n=1))
        host = eng.host
        assert host is not None
        in_host = [h for h in sequence_hashes(prompt(1, 97), BS) if h in host]
        agent = await eng.open_transfers("worker-a")
        assert await eng.open_transfers("worker-a") is agent  # made once
        held, addrs = eng.lend_host_blocks(in_host)
        assert held == in_host and len(held) >= 3
        reader = ucx_agent("reader")
        got = torch.zeros(len(held), 1, dtype=torch.float64)
        reader.register_memory([(got.data_ptr(), got.numel() * 8, 0, "")], "DRAM")
        reader.add_remote_agent(agent.get_agent_metadata())
        run_transfer(reader, "READ",
                     reader.get_xfer_descs([(got[i].data_ptr(), 8, 0) for i in range(len(held))],
                                           "DRAM"),
                     reader.get_xfer_descs([(a, 8, 0) for a in addrs], "DRAM"), "worker-a")
        eng.return_host_blocks(held)
        assert got[:, 0].tolist() == [float(h % (1 << 40)) for h in held]
        assert not host._pinned
    finally:
        await eng.stop()


async def test_a_worker_pulls_only_the_lent_blocks_it_lacks_and_the_lease_ends(
        ucx_loopback: None) -> None:
    """Worker B reads worker A's lent blocks over NIXL into its own host tier, by a
    descriptor that crossed the wire, skipping the ones it holds; the READ's
    notification ends A's lease; B then answers the prompt from those blocks."""
    from dynamo_bus.bus.messages import KV_DESCRIPTOR, KVDescriptor, pack_hashes
    from dynamo_bus.transfer import LeaseBook

    a = FakeKVEngine("m", vocab_size=32_000, block_size=BS, num_blocks=8, host_blocks=32,
                     kv_offload="write-through")
    b = FakeKVEngine("m", vocab_size=32_000, block_size=BS, num_blocks=8, host_blocks=32)
    await a.start()
    await b.start()
    try:
        ids = prompt(1, 97)
        hashes = sequence_hashes(ids, BS)[:6]
        await run(a, req("a", ids, n=1))                # write-through: all 6 in A's host
        await run(b, req("b", ids[:2 * BS + 1], n=1))   # B computed the first 2 itself
        assert a.kv_digest and a.kv_digest == b.kv_digest
        await a.open_transfers("worker-a")
        await b.open_transfers("worker-b")
        held, addrs = a.lend_host_blocks(hashes)
        assert held == hashes
        leases = LeaseBook(a.return_host_blocks, ttl=30)
        leases.grant("a.1", held)
        wire = KV_DESCRIPTOR.encode(KVDescriptor(
            request_id="a", agent="worker-a", hashes=pack_hashes(held), addrs=addrs,
            block_bytes=a.host.block_bytes, kv=a.kv_digest, lease="a.1",
            lease_expires=1e12))
        d = KV_DESCRIPTOR.decode(wire)
        metadata = a.transfer_metadata()
        for bad, why in ((msgspec.structs.replace(d, kv="00" * 16), "another model"),
                         (msgspec.structs.replace(d, addrs=addrs[:-1]), "6 blocks and 5"),
                         (msgspec.structs.replace(d, lease_expires=1.0), "ran out")):
            with pytest.raises(ValueError, match=why):
                await b.pull_host_blocks(bad, metadata)
        stored = b.host.stored
        n = await b.pull_host_blocks(d, metadata)
        assert n == 6 and b.host.stored == stored + 4          # the 4 it lacked, no more
        for h in hashes[2:]:
            assert float(b.host.data[b.host.slot(h), 0]) == float(h % (1 << 40))
        for _ in range(100):  # the notification arrives with the transfer's completion
            if leases.on_notices(await a.transfer_notices()):
                break
            await asyncio.sleep(0.01)
        assert "a.1" not in leases and not a.host._pinned
        again = await run(b, req("b2", ids, n=1))
        assert again[0].cached_tokens == 6 * BS               # 2 in its pool, 4 pulled
        # Lent again to a reader that holds them all: nothing to read, the lease ends.
        held, _ = a.lend_host_blocks(hashes)
        leases.grant("a.2", held)
        stored = b.host.stored
        assert await b.pull_host_blocks(msgspec.structs.replace(d, lease="a.2"), metadata) == 6
        assert b.host.stored == stored
        for _ in range(100):
            if leases.on_notices(await a.transfer_notices()):
                break
            await asyncio.sleep(0.01)
        assert len(leases) == 0 and not a.host._pinned and leases.completed == 2
    finally:
        await a.stop()
        await b.stop()



LENDER = """
import json, sys, torch
from dynamo_bus.kvbm.nixl import ucx_agent
data = torch.arange(8, dtype=torch.float64)
agent = ucx_agent("lender")
agent.register_memory([(data.data_ptr(), 64, 0, "")], "DRAM")
print(json.dumps({"metadata": bytes(agent.get_agent_metadata()).hex(),
                  "base": data.data_ptr()}), flush=True)
sys.stdin.read()
"""


class Lender:
    """Another process whose NIXL agent lends 8 float64 blocks (block i holds i)."""

    def __init__(self) -> None:
        import json
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", LENDER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        peer = json.loads(self.proc.stdout.readline())
        self.metadata, self.base = bytes.fromhex(peer["metadata"]), peer["base"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def lender(ucx_loopback: None) -> Any:
    it = Lender()  # it inherits the loopback-only UCX settings
    yield it
    it.kill()


async def test_a_read_from_a_lender_that_died_fails_fast_and_keeps_nothing(
        lender: Lender) -> None:
    """The lender's process is gone between its descriptor and the READ: the pull
    raises NixlError at once (no hang), and the reader's host tier keeps none of the
    blocks it had set aside for them."""
    import time

    from dynamo_bus.bus.messages import KVDescriptor, pack_hashes
    from dynamo_bus.kvbm.nixl import NixlError

    b = FakeKVEngine("m", vocab_size=32_000, block_size=BS, num_blocks=8, host_blocks=32)
    await b.start()
    try:
        await b.open_transfers("reader")
        hashes = sequence_hashes(prompt(9, 97), BS)[:4]
        d = KVDescriptor(request_id="r", agent="lender", hashes=pack_hashes(hashes),
                         addrs=[lender.base + 8 * i for i in range(4)], block_bytes=8,
                         kv=b.kv_digest, lease="r.1", lease_expires=time.time() + 30)
        assert await b.pull_host_blocks(d, lender.metadata) == 4  # alive: block i is i
        assert [float(b.host.data[b.host.slot(h), 0]) for h in hashes] == [0, 1, 2, 3]
        b.host.discard(hashes)
        with pytest.raises(NixlError, match="cannot reach nobody"):  # metadata unusable
            await b.pull_host_blocks(msgspec.structs.replace(d, agent="nobody"), b"junk")
        assert not any(h in b.host for h in hashes) and not b.host._writing
        lender.kill()
        with pytest.raises(NixlError):
            await asyncio.wait_for(b.pull_host_blocks(d, lender.metadata), 10)
        assert not any(h in b.host for h in hashes) and not b.host._writing
    finally:
        await b.stop()
