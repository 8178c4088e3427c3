"""How the outbox cuts a pass's chunks into messages, in order, and loses none."""

from __future__ import annotations

import asyncio

from dynamo_bus.bus.messages import RESPONSE, Chunk, ChunkBatch, unbatch
from dynamo_bus.worker.outbox import MAX_BATCH_BYTES, Outbox, _payloads


def _chunk(rid: str, n: int) -> bytes:
    return RESPONSE.encode(Chunk(request_id=rid, index=0, token_ids=list(range(n))))


def test_a_lone_chunk_goes_as_it_is() -> None:
    data = _chunk("a", 3)
    assert _payloads([data]) == [data]


def test_chunks_of_one_pass_go_as_one_batch_in_order() -> None:
    items = [_chunk(f"r{i}", 1) for i in range(8)]
    [payload] = _payloads(items)
    batch = RESPONSE.decode(payload)
    assert isinstance(batch, ChunkBatch)
    assert [c.request_id for c in unbatch(batch)] == [f"r{i}" for i in range(8)]


def test_batches_stay_under_the_size_limit_and_keep_every_chunk() -> None:
    items = [_chunk(f"r{i}", 4000) for i in range(40)]  # ~20 KB each
    payloads = _payloads(items)
    assert len(payloads) > 1
    assert all(len(p) <= MAX_BATCH_BYTES + 64 for p in payloads)
    got = [c for p in payloads for c in unbatch(RESPONSE.decode(p))]
    assert [c.request_id for c in got] == [f"r{i}" for i in range(40)]
    # One chunk larger than the limit still goes, alone.
    big = _chunk("big", 60_000)
    assert _payloads([items[0], big, items[1]])[1] == big


class FakeNats:
    """A fake of the outbox's ``Publisher`` (publish and the payload limit); a publish
    can be made to wait, to cancel a flush midway."""

    max_payload = 1 << 20

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.hold: asyncio.Event | None = None

    async def publish(self, subject: str, payload: bytes) -> None:
        if self.hold is not None:
            await self.hold.wait()
        self.sent.append((subject, payload))


def _ids(nc: FakeNats, subject: str) -> list[str]:
    return [c.request_id for s, p in nc.sent if s == subject
            for c in unbatch(RESPONSE.decode(p))]


async def test_a_pass_goes_as_one_message_per_subject_in_order() -> None:
    nc = FakeNats()
    box = Outbox(nc)
    for i in range(4):
        box.put("fe1", _chunk(f"a{i}", 1))
        box.put("fe2", _chunk(f"b{i}", 1))
    await asyncio.sleep(0)
    await box.close()
    assert len(nc.sent) == 2
    assert _ids(nc, "fe1") == ["a0", "a1", "a2", "a3"]
    assert _ids(nc, "fe2") == ["b0", "b1", "b2", "b3"]


async def test_a_flush_cancelled_midway_loses_nothing() -> None:
    nc = FakeNats()
    nc.hold = asyncio.Event()
    box = Outbox(nc)
    box.put("fe1", _chunk("a0", 1))
    box.put("fe2", _chunk("b0", 1))
    flushing = asyncio.ensure_future(box.flush())
    await asyncio.sleep(0.01)        # waits in its first publish
    flushing.cancel()
    box.put("fe2", _chunk("b1", 1))  # put while the rest waits to go again
    nc.hold = None
    await asyncio.sleep(0.01)
    await box.close()
    assert "a0" in _ids(nc, "fe1")
    assert _ids(nc, "fe2") == ["b0", "b1"]
