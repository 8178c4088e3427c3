"""How the outbox cuts a pass's chunks into messages."""

from __future__ import annotations

from dynamo_bus.bus.messages import RESPONSE, Chunk, ChunkBatch, unbatch
from dynamo_bus.worker.outbox import MAX_BATCH_BYTES, _payloads


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
