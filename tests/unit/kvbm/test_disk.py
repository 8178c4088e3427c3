"""The disk tier (G3) on real files through real NIXL (POSIX backend): blocks come back
bit for bit, across a restart too; admission skips blocks asked for once; a corrupt,
truncated or foreign block is dropped, never handed on; a full disk turns the tier off
with one log line and the rest goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nixl_cu12")

from dynamo_bus.kvbm.disk import DiskTier  # noqa: E402
from dynamo_bus.kvbm.files import HEADER_BYTES, BlockFiles, fingerprint_digest  # noqa: E402

SHAPE = (2, 4, 2, 2, 16)  # layers, block size, K/V, kv heads, head dim


def make_tier(root: Path, *, capacity: int = 16, dtype: Any = torch.float32,
              admit_after: int = 1, model: str = "m", **kw: Any) -> DiskTier:
    files = BlockFiles(root, capacity, block_shape=SHAPE, dtype=dtype,
                       fingerprint=fingerprint_digest(model, SHAPE, dtype), staging_blocks=4,
                       **kw)
    return DiskTier(capacity, files=files, admit_after=admit_after)


def blocks(n: int, dtype: Any = torch.float32, seed: int = 0) -> Any:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *SHAPE), generator=g).to(dtype)


async def put(tier: DiskTier, hashes: list[int], data: Any) -> list[int]:
    """What the host tier does when it evicts ``hashes`` (its rows of ``data``): returns
    the hashes the disk tier took."""
    taken = []
    for i in range(0, len(hashes), 4):  # at most the staging rows per eviction
        plan = tier.demote([(h, i + j) for j, h in enumerate(hashes[i:i + 4])])
        tier.stage(plan, data)
        tier.write_later(plan)
        taken += [h for h, *_ in plan]
        await tier.flush()  # a burst beyond the staging rows would be skipped
    return taken


async def get(tier: DiskTier, hashes: list[int]) -> tuple[int, Any]:
    parts: dict[int, Any] = {}

    def sink(first: int, rows: Any) -> None:
        parts[first] = rows.clone()

    tier.pin(hashes)
    try:
        n = await tier.read(hashes, sink)
    finally:
        tier.unpin(hashes)
    got = torch.cat([parts[k] for k in sorted(parts)]) if parts else None
    return n, got


def slot_file(tier: DiskTier, block_hash: int) -> tuple[Path, int]:
    files = tier.files
    assert files is not None and files.directory is not None
    index, i = divmod(tier.slot(block_hash), files.slots_per_file)
    path = next(files.directory.glob(f"kv-*-{index:04d}.blocks"))
    return path, i * files.slot_bytes


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def flip_bit(path: Path, offset: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        byte = os.pread(fd, 1, offset)[0]
    finally:
        os.close(fd)
    write_at(path, offset, bytes([byte ^ 0x10]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
async def test_blocks_come_back_bit_for_bit(tmp_path: Path, dtype: Any) -> None:
    tier = make_tier(tmp_path, dtype=dtype)
    await tier.start()
    try:
        data = blocks(10, dtype)
        hashes = list(range(100, 110))
        assert await put(tier, hashes, data) == hashes
        assert tier.prefix(hashes) == 10 and tier.stored == 10
        n, got = await get(tier, hashes)  # more than the staging rows: read in runs
        assert n == 10 and torch.equal(got, data)
        n, got = await get(tier, hashes[3:5])
        assert n == 2 and torch.equal(got, data[3:5])
    finally:
        await tier.close()


async def test_blocks_asked_for_once_are_not_written(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, admit_after=2)
    await tier.start()
    try:
        tier.note_seen([1, 2, 3])
        tier.note_seen([2, 3])
        tier.note_seen([3], first=False)  # a preempted request admitted again: not counted
        assert await put(tier, [1, 2, 3], blocks(3)) == [2, 3]
        assert tier.skipped == 1 and 1 not in tier
    finally:
        await tier.close()


async def test_a_restarted_tier_finds_its_blocks(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, capacity=4)
    await tier.start()
    data = blocks(4)
    await put(tier, [1, 2, 3, 4], data)
    n, _ = await get(tier, [1])  # 1 is now the most recently used
    await tier.close()

    again = make_tier(tmp_path, capacity=4)
    await again.start()
    try:
        assert again.files is not None and again.files.directory == tmp_path / "w0"
        assert again.drain_changes() == {1: True, 2: True, 3: True, 4: True}  # republished
        n, got = await get(again, [1, 2, 3, 4])
        assert n == 4 and torch.equal(got, data)
        # The write order came back with them: the oldest write goes first.
        await put(again, [5], blocks(1, seed=1))
        assert 1 not in again and {2, 3, 4, 5} <= {h for h in range(6) if h in again}
    finally:
        await again.close()


async def test_workers_sharing_a_directory_each_claim_their_own(tmp_path: Path) -> None:
    a, b = make_tier(tmp_path), make_tier(tmp_path)
    await a.start()
    await b.start()
    try:
        assert a.files is not None and b.files is not None
        assert {a.files.directory, b.files.directory} == {tmp_path / "w0", tmp_path / "w1"}
    finally:
        await a.close()
        await b.close()


async def test_a_corrupt_block_is_dropped_and_never_handed_on(tmp_path: Path) -> None:
    tier = make_tier(tmp_path)
    await tier.start()
    try:
        data = blocks(3)
        await put(tier, [1, 2, 3], data)
        path, offset = slot_file(tier, 2)
        flip_bit(path, offset + HEADER_BYTES + 100)  # in block 2's KV, on the disk
        n, got = await get(tier, [1, 2, 3])
        assert n == 1 and torch.equal(got, data[:1])  # block 2 and after: computed instead
        assert tier.corrupt == 1 and 2 not in tier and 3 in tier
        assert tier.disabled is None
        n, got = await get(tier, [3])
        assert n == 1 and torch.equal(got, data[2:])
    finally:
        await tier.close()


async def test_a_file_cut_short_loses_its_tail_not_the_tier(tmp_path: Path) -> None:
    tier = make_tier(tmp_path)
    await tier.start()
    try:
        data = blocks(3)
        await put(tier, [1, 2, 3], data)
        path, offset = slot_file(tier, 2)
        os.truncate(path, offset + 100)  # cut inside block 2
        n, got = await get(tier, [1, 2, 3])
        assert n == 1 and torch.equal(got, data[:1])
        assert 2 not in tier and tier.disabled is None
    finally:
        await tier.close()


async def test_bad_headers_and_cut_files_are_dropped_at_start(tmp_path: Path) -> None:
    tier = make_tier(tmp_path)
    await tier.start()
    data = blocks(4)
    await put(tier, [1, 2, 3, 4], data)
    path, first = slot_file(tier, 1)
    _, third = slot_file(tier, 3)
    await tier.close()
    write_at(path, first, b"not a KV block header" * 3)  # a foreign header in slot 1
    os.truncate(path, third + 1000)  # and the file cut inside block 3

    again = make_tier(tmp_path)
    await again.start()
    try:
        assert [h for h in (1, 2, 3, 4) if h in again] == [2]
        assert again.corrupt == 2  # the foreign header and the cut slot
        n, got = await get(again, [2])
        assert n == 1 and torch.equal(got, data[1:2])
        await put(again, [5, 6, 7], blocks(3, seed=2))  # the cut file is whole again
        n, got = await get(again, [5, 6, 7])
        assert n == 3 and torch.equal(got, blocks(3, seed=2))
    finally:
        await again.close()


async def test_another_models_blocks_are_left_alone(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, model="model-a")
    await tier.start()
    await put(tier, [1, 2], blocks(2))
    await tier.close()
    before = {p.name: p.stat().st_size for p in (tmp_path / "w0").glob("kv-*")}

    other = make_tier(tmp_path, model="model-b")
    await other.start()
    try:
        assert len(other) == 0 and other.corrupt == 0
        await put(other, [1, 2], blocks(2, seed=3))
        n, got = await get(other, [1, 2])
        assert n == 2 and torch.equal(got, blocks(2, seed=3))
    finally:
        await other.close()
    after = {p.name: p.stat().st_size for p in (tmp_path / "w0").glob("kv-*")}
    assert before.items() <= after.items() and len(after) == 2
    first = make_tier(tmp_path, model="model-a")
    await first.start()
    try:
        n, got = await get(first, [1, 2])
        assert n == 2 and torch.equal(got, blocks(2))
    finally:
        await first.close()


FULL_DISK = textwrap.dedent("""
    import asyncio, json, logging, resource, signal, sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from test_disk import blocks, make_tier, put

    async def main():
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("dynamo_bus").addHandler(handler)
        slot = 8192  # one block of the test's shape, with its header
        tier = make_tier(__import__("pathlib").Path(sys.argv[1]), capacity=64,
                         file_bytes=2 * slot)
        await tier.start()
        await put(tier, [1, 2], blocks(2))  # the first file holds these two ...
        # ... and then the disk is full: no new file gets its room
        assert tier.files.slot_bytes == slot
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (slot, resource.RLIM_INFINITY))
        changes = tier.drain_changes()
        await put(tier, [3, 4, 5], blocks(3))
        lost = tier.drain_changes()
        after = tier.demote([(6, 0)])
        n = tier.prefix([1])  # nothing is found there any more
        await tier.close()
        errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
        print(json.dumps({"disabled": tier.disabled, "held": len(tier), "errors": errors,
                          "lost": sorted(h for h, held in lost.items() if not held),
                          "after": len(after), "read": n, "first": sorted(changes)}))

    asyncio.run(main())
""")


def test_a_full_disk_turns_the_tier_off_with_one_line(tmp_path: Path) -> None:
    # A real "no room": the kernel's file size limit, in a child process of its own.
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "kv"),
                          str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["first"] == [1, 2]
    assert result["disabled"] and "File too large" in result["disabled"]
    assert len(result["errors"]) == 1 and "KV disk tier off" in result["errors"][0]
    assert result["held"] == 0 and result["lost"] == [1, 2, 3, 4, 5]  # residency drops them
    assert result["after"] == 0 and result["read"] == 0

