"""The wire schema: round trips, and old and new builds reading each other."""

from __future__ import annotations

import msgspec
import pytest

from dynamo_bus.bus.messages import (
    CANCEL,
    KV_DESCRIPTOR,
    KV_READ_DONE,
    LOAD,
    REGISTRATION,
    REQUEST,
    RESEND,
    RESEND_ACK,
    RESIDENCY_BATCH,
    RESIDENCY_SNAPSHOT,
    RESPONSE,
    Cancel,
    Chunk,
    ChunkBatch,
    Error,
    Fingerprint,
    KVDescriptor,
    KVReadDone,
    Load,
    Registration,
    Request,
    Resend,
    ResendAck,
    ResidencyBatch,
    ResidencySnapshot,
    RoutingHints,
    SamplingOptions,
    Usage,
    join_responses,
    pack_hashes,
    unbatch,
    unpack_hashes,
)
from dynamo_bus.errors import ProtocolError

SAMPLES = [
    (REQUEST, Request(request_id="r1", model="m", token_ids=[1, 2, 3], reply_to="inbox",
                      sampling=SamplingOptions(max_tokens=5, temperature=0.5, seed=9,
                                               stop_token_ids=[2]),
                      routing=RoutingHints(strategy="random"), priority=3, created_ns=7)),
    (RESPONSE, Chunk(request_id="r1", index=4, token_ids=[9, 8], worker_id="w",
                     finish_reason="length", usage=Usage(prompt_tokens=3, completion_tokens=6))),
    (RESPONSE, Chunk(request_id="r1", index=0, token_ids=[9, 8], logprobs=[-0.5, -1.25],
                     top_logprobs=[[(9, -0.5), (7, -2.0)], [(8, -1.25), (1, -1.5)]])),
    (RESPONSE, Error(request_id="r1", status=503, message="no worker", code="no_worker")),
    (RESPONSE, Chunk(request_id="r1", index=0, token_ids=[], worker_id="w",
                     incarnation="5f0c")),
    (CANCEL, Cancel(request_id="r1")),
    (RESEND, Resend(request_id="r1", from_index=17)),
    (RESEND_ACK, ResendAck(request_id="r1", worker_id="w", incarnation="5f0c", chunks=3,
                           finished=True)),
    (REGISTRATION, Registration(worker_id="w", model="m", fingerprint=Fingerprint("m", 16),
                                work_subject="dyn.x.work.w", capacity=8, incarnation="5f0c")),
    (LOAD, Load(worker_id="w", active_requests=2, capacity=8, tier_blocks={"host": 3},
                tier_moves={"host": {"onboarded_blocks": 3, "onboard_seconds": 0.25}})),
    (KV_DESCRIPTOR, KVDescriptor(request_id="r1", agent="w-agent",
                                 hashes=pack_hashes([1, 2**64 - 1]), addrs=[4096, 2**47],
                                 block_bytes=368640, kv="ab" * 16, lease="r1.1",
                                 lease_expires=1.8e9, first_token=42)),
    (KV_READ_DONE, KVReadDone(lease="r1.1")),
    (RESIDENCY_BATCH, ResidencyBatch(worker_id="w", instance=5, seq=2,
                                     stored=pack_hashes([1, 2**64 - 1]), tiers=b"\x00\x02",
                                     removed=pack_hashes([3]))),
    (RESIDENCY_SNAPSHOT, ResidencySnapshot(worker_id="w", instance=5, seq=2, stream_seq=40,
                                           hashes=pack_hashes([1]), tiers=b"\x01")),
]


@pytest.mark.parametrize(("codec", "obj"), SAMPLES)
def test_round_trip(codec, obj) -> None:
    assert codec.decode(codec.encode(obj)) == obj


# What version 1 of a message looked like to a reader built before a field was added:
class OldChunk(msgspec.Struct, tag="chunk", tag_field="type"):
    request_id: str
    index: int
    token_ids: list[int]


class FutureChunk(msgspec.Struct, tag="chunk", tag_field="type"):
    request_id: str
    index: int
    token_ids: list[int]
    worker_id: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    logprobs: list[float] | None = None
    v: int = 1
    spec_decode_accepted: int = 0  # a field a later build adds, last and defaulted


def test_new_reader_fills_defaults_for_an_old_message() -> None:
    old = msgspec.json.encode(OldChunk(request_id="a", index=0, token_ids=[1]))
    chunk = RESPONSE.decode(old)
    assert isinstance(chunk, Chunk)
    assert (chunk.finish_reason, chunk.usage, chunk.v) == (None, None, 1)


def test_old_reader_skips_fields_it_does_not_know() -> None:
    new = RESPONSE.encode(Chunk(request_id="a", index=0, token_ids=[1], worker_id="w"))
    assert msgspec.json.decode(new, type=OldChunk) == OldChunk("a", 0, [1])
    future = msgspec.json.encode(FutureChunk("a", 0, [1], spec_decode_accepted=3))
    assert RESPONSE.decode(future).token_ids == [1]


def test_top_logprobs_are_optional_on_the_wire() -> None:
    # Absent unless asked for, so chunks without logprobs are as before.
    plain = RESPONSE.encode(Chunk(request_id="a", index=0, token_ids=[1]))
    assert b"logprobs" not in plain
    # A reader built before top_logprobs existed still reads the tokens and logprobs.
    new = RESPONSE.encode(Chunk(request_id="a", index=0, token_ids=[1], logprobs=[-0.5],
                                top_logprobs=[[(1, -0.5), (2, -3.0)]]))
    old = msgspec.json.decode(new, type=FutureChunk)
    assert (old.token_ids, old.logprobs) == ([1], [-0.5])
    # And this build reads what an older writer sent: no top_logprobs at all.
    older = msgspec.json.encode(FutureChunk("a", 0, [1], logprobs=[-0.5]))
    chunk = RESPONSE.decode(older)
    assert isinstance(chunk, Chunk)
    assert (chunk.logprobs, chunk.top_logprobs, chunk.v) == ([-0.5], None, 1)


def test_a_newer_schema_version_is_refused_clearly() -> None:
    data = b'{"request_id":"a","model":"m","token_ids":[1],"reply_to":"x","v":99}'
    with pytest.raises(ProtocolError, match="schema version 99"):
        REQUEST.decode(data)


def test_garbage_is_a_protocol_error_not_a_crash() -> None:
    with pytest.raises(ProtocolError, match="malformed Request"):
        REQUEST.decode(b'{"request_id": 5}')


def test_plain_json_publishers_need_only_the_required_fields() -> None:
    req = REQUEST.decode(b'{"request_id":"a","model":"m","token_ids":[1,2],"reply_to":"x"}')
    assert req.sampling.max_tokens == 16 and req.routing.strategy is None


def test_block_hashes_pack_into_8_byte_little_endian_words() -> None:
    hashes = [0, 1, 0x0123456789ABCDEF, 2**64 - 1]
    packed = pack_hashes(hashes)
    assert packed[8:16] == (1).to_bytes(8, "little") and len(packed) == 32
    assert list(unpack_hashes(packed)) == hashes
    with pytest.raises(ProtocolError, match="8-byte"):
        unpack_hashes(b"\x00" * 12)


def test_a_batch_spliced_from_encoded_chunks_reads_as_those_chunks() -> None:
    items = [Chunk(request_id="a", index=0, token_ids=[], worker_id="w", incarnation="i"),
             Chunk(request_id="b", index=3, token_ids=[7], logprobs=[-0.5]),
             Error(request_id="c", status=503, message="gone", code="worker_lost"),
             Chunk(request_id="a", index=0, token_ids=[1, 2], finish_reason="stop",
                   usage=Usage(prompt_tokens=4, completion_tokens=2))]
    data = join_responses([RESPONSE.encode(item) for item in items])
    batch = RESPONSE.decode(data)
    assert batch == ChunkBatch(items=items)
    assert unbatch(batch) == items
    # Encoded by msgspec or spliced: the same bytes.
    assert data == RESPONSE.encode(ChunkBatch(items=items))
    lone = RESPONSE.decode(RESPONSE.encode(items[1]))
    assert unbatch(lone) == [items[1]]


def test_a_newer_chunk_inside_a_batch_is_left_out_and_the_rest_kept() -> None:
    newer = b'{"type":"chunk","request_id":"a","index":0,"token_ids":[1],"v":7}'
    batch = RESPONSE.decode(join_responses([RESPONSE.encode(Chunk("b", 0, [2])), newer]))
    assert unbatch(batch) == [Chunk("b", 0, [2])]
