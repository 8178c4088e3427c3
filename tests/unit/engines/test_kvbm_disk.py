"""The disk tier (G3) under the host tier, in an engine: the simulated engine's
bookkeeping (blocks move down a tier, come back, and only the blocks asked for often
enough are written), and, with real block files, the pool's and every tier's invariants
under random load, property-based: a block is owned by one slot per tier, nothing stays
pinned, and every block a tier holds carries its own KV, never another's."""

from __future__ import annotations

import asyncio
import tempfile

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_bus.config import Config
from dynamo_bus.engines import make_engine
from dynamo_bus.engines.mock import MockEngine
from dynamo_bus.errors import ConfigError
from dynamo_bus.hashing import sequence_hashes
from dynamo_bus.kvbm.disk import DiskTier
from dynamo_bus.kvbm.tier import BlockTier
from tests.unit.engines.test_kvbm_tiers import BS, TOKEN_BYTES, FakeKVEngine, prompt, req, run
from tests.unit.engines.test_mock_engine import FakeClock


def mock(admit_after: int = 1) -> MockEngine:
    # G1 8 blocks, G2 4, G3 64: a prompt of 6 blocks leaves G1 and G2 after two others.
    return MockEngine("m", vocab_size=32_000, clock=FakeClock(), num_blocks=8, block_size=BS,
                      kv_bytes_per_token=TOKEN_BYTES, host_blocks=4, disk_blocks=64,
                      disk_admit_after=admit_after)


async def test_a_prefix_pushed_below_the_host_tier_comes_back_from_disk() -> None:
    eng = mock()
    await eng.start()
    try:
        a = sequence_hashes(prompt(1), BS)[:5]
        first = await run(eng, req("a", prompt(1)))
        eng.residency_changes()
        await run(eng, req("b", prompt(2)))
        await run(eng, req("c", prompt(3)))
        host, disk = eng.host, eng.disk
        assert host is not None and disk is not None
        assert eng.pool.lookup(a) == [] and host.prefix(a) == 0 and disk.prefix(a) == 5
        changes = eng.residency_changes()
        assert {changes[h] for h in a} == {"disk"}  # moved down, not gone
        load = eng.load()
        assert load.tier_blocks["disk"] == len(disk) and load.tier_capacity["disk"] == 64
        again = await run(eng, req("a2", prompt(1)))
        assert again[0].cached_tokens == 5 * BS and disk.onboarded == 5
        assert [t for o in again for t in o.token_ids] == [t for o in first for t in o.token_ids]
    finally:
        await eng.stop()


@pytest.mark.parametrize(("asks", "written"), [(1, False), (2, True)])
async def test_only_blocks_asked_for_twice_are_written_to_disk(asks: int, written: bool) -> None:
    eng = mock(admit_after=2)
    await eng.start()
    try:
        a = sequence_hashes(prompt(1), BS)[:5]
        for i in range(asks):
            await run(eng, req(f"a{i}", prompt(1)))
        await run(eng, req("b", prompt(2)))
        await run(eng, req("c", prompt(3)))
        disk = eng.disk
        assert disk is not None
        assert (disk.prefix(a) == 5) is written
        if not written:
            assert disk.skipped >= 5  # not worth a disk write
    finally:
        await eng.stop()


def test_a_disk_tier_needs_a_host_tier() -> None:
    with pytest.raises(ValueError, match="host tier"):
        MockEngine("m", vocab_size=100, host_blocks=0, disk_blocks=8)


def _owners_are_unique(tier: BlockTier) -> None:
    slots = list(tier._slot.values())
    assert len(set(slots)) == len(slots)
    assert sorted([*slots, *tier._free]) == list(range(tier.capacity))
    assert not tier._pinned and not tier._writing


async def read_back(disk: DiskTier, hashes: list[int]) -> list[float]:
    got: list[float] = []
    disk.pin(hashes)
    try:
        await disk.read(hashes, lambda first, rows: got.extend(rows[:, 0].tolist()))
    finally:
        disk.unpin(hashes)
    return got


OPS = st.lists(st.tuples(st.integers(0, 5), st.integers(1, 60), st.integers(1, 6),
                         st.booleans()), min_size=4, max_size=24)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, admit=st.sampled_from([1, 2]))
def test_every_tier_keeps_its_invariants_under_random_load(
        ops: list[tuple[int, int, int, bool]], admit: int) -> None:
    """Random requests (one of six shared prefixes, a random tail, a few tokens, maybe
    aborted) in concurrent waves, on an engine whose KV for a block is the block's hash,
    with G1 10 blocks, G2 6, G3 24 on disk."""
    pytest.importorskip("nixl_cu12")
    prefixes = [prompt(500 + i, 48) for i in range(6)]

    async def body(directory: str) -> None:
        eng = FakeKVEngine("m", vocab_size=32_000, block_size=BS, num_blocks=10,
                           host_blocks=6, disk_blocks=24, disk_dir=directory,
                           disk_admit_after=admit)
        await eng.start()

        async def one(i: int, which: int, tail: int, n: int, abort: bool) -> None:
            gen = eng.generate(req(f"r{i}", prefixes[which] + prompt(i, tail), n=n))
            try:
                async for _ in gen:
                    if abort:
                        await eng.abort(f"r{i}")
            finally:
                await gen.aclose()

        try:
            for w in range(0, len(ops), 4):
                await asyncio.gather(*(one(w + j, *op) for j, op in enumerate(ops[w:w + 4])))
                host, disk = eng.host, eng.disk
                assert host is not None and disk is not None and disk.files is not None
                await disk.flush()
                for _ in range(2000):  # an aborted request's blocks go once its step ran
                    if not eng._planned:
                        break
                    await asyncio.sleep(0.001)
                assert eng.pool.num_active == 0
                _owners_are_unique(host)
                _owners_are_unique(disk)
                for h, slot in host._slot.items():  # each host block holds its own KV
                    assert float(host.data[slot, 0]) == float(h % (1 << 40))
                held = list(disk._slot)
                if held:  # and each disk block reads back as its own, checksum and all
                    assert await read_back(disk, held) == [float(h % (1 << 40)) for h in held]
                    assert disk.corrupt == 0
        finally:
            await eng.stop()

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(body(directory))


@pytest.mark.parametrize(("flags", "says"), [
    ({"kvbm_disk_gib": 1.0}, "--kvbm-disk-dir"),
    ({"kvbm_disk_dir": "/tmp/kv"}, "--kvbm-disk-gib is 0"),
    ({"kvbm_disk_gib": 1.0, "kvbm_disk_dir": "/tmp/kv", "kvbm_host_gib": 0.0}, "host tier"),
    ({"kvbm_disk_gib": -1.0}, ">= 0"),
    ({"kvbm_disk_admit": 0}, ">= 1"),
])
def test_disk_tier_settings_that_cannot_work_are_refused(flags: dict[str, object],
                                                         says: str) -> None:
    cfg = msgspec.structs.replace(Config(engine="reference"), **flags)
    with pytest.raises(ConfigError, match=says):
        make_engine(cfg, None, "m")  # type: ignore[arg-type]  # refused before the model
