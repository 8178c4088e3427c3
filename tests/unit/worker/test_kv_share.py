"""Two workers' KV shares over a real nats-server and NIXL (UCX, loopback shared
memory): a lease ends when its reader is done, or when its time runs out, and a
reader refuses what it must not read."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dynamo_bus.bus.connection import connect, ensure_agents_bucket
from dynamo_bus.bus.messages import KV_DESCRIPTOR
from dynamo_bus.bus.subjects import Names
from dynamo_bus.hashing import sequence_hashes
from dynamo_bus.transfer import AgentDirectory
from dynamo_bus.worker.kv_share import KVShare
from tests.unit.engines.test_kvbm_tiers import BS, FakeKVEngine, prompt, req, run


async def until(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_lent_blocks_are_pulled_and_their_leases_end(
        nats_server: Any, ucx_loopback: None) -> None:
    nc = await connect(nats_server.url, name="kv-share-test")
    engines = [FakeKVEngine("m", vocab_size=32_000, block_size=BS, num_blocks=8,
                            host_blocks=32) for _ in range(2)]
    shares: list[KVShare] = []
    try:
        kv = await ensure_agents_bucket(nc.jetstream(), Names("dynamo"))
        for i, eng in enumerate(engines):
            await eng.start()
            shares.append(KVShare(eng, AgentDirectory(kv), worker_id=f"w{i}",
                                  incarnation="ab12", lease_s=0.3))
            await shares[-1].start()
        lender, reader = shares
        ids = prompt(4, 97)
        hashes = sequence_hashes(ids, BS)[:6]
        await run(engines[0], req("p", ids, n=1))
        assert await lender.lend("none", [12345]) is None  # holds none of it: nothing lent

        # Read, then done: the reader's notification ends the lease, nothing pinned.
        lent = await lender.lend("p", hashes, first_token=7)  # parked from the pool first
        d = KV_DESCRIPTOR.decode(KV_DESCRIPTOR.encode(lent))
        assert d.agent == "w0.ab12" and d.first_token == 7
        assert await reader.pull(d) == 6
        await until(lambda: not lender.leases)
        assert lender.leases.completed == 1 and not engines[0].host._pinned
        out = await run(engines[1], req("d", ids, n=1))
        assert out[0].cached_tokens == 6 * BS

        # Never read: the lease runs out and frees the blocks; a late reader refuses.
        late = await lender.lend("q", hashes)
        assert late is not None and engines[0].host._pinned
        await until(lambda: not lender.leases)
        assert lender.leases.expired == 1 and not engines[0].host._pinned
        with pytest.raises(ValueError, match="ran out"):
            await reader.pull(late)

        # A lender that stopped is gone from the directory.
        await lender.stop()
        with pytest.raises(LookupError, match=r"no NIXL agent w0\.ab12"):
            await AgentDirectory(kv).lookup("w0.ab12")
    finally:
        for share in shares:
            await share.stop()
        for eng in engines:
            await eng.stop()
        await nc.close()
