"""Every message that crosses the bus, as msgspec Structs: the one wire schema.

Rules for changing this module (see msgspec's schema-evolution guide):

* a new field goes last, with a default, so old readers skip it and new readers of
  old messages get the default;
* a field's type never changes and a field is never renumbered or renamed;
* a change that cannot follow these rules bumps ``SCHEMA_VERSION``; writers then
  set ``v`` explicitly and readers refuse messages whose ``v`` is newer than they
  understand. ``v`` defaults to 1 forever, so a message without it is version 1.

Everything is JSON on the wire, so any plain NATS publisher can submit a request and
read the token stream without this library. Messages on the response stream are a
tagged union (field ``type``) so one subscription can carry every kind.
"""

from __future__ import annotations

import sys
import time
from array import array
from collections.abc import Iterable
from typing import Generic, Literal, TypeVar

import msgspec

from dynamo_bus.errors import ProtocolError

SCHEMA_VERSION = 1

FinishReason = Literal["stop", "length", "cancelled", "error"]
RoutingStrategy = Literal["kv_aware", "round_robin", "random", "least_loaded", "direct"]
ROUTING_STRATEGIES: tuple[str, ...] = RoutingStrategy.__args__  # type: ignore[attr-defined]
Role = Literal["aggregated", "prefill", "decode"]


class SamplingOptions(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """How to pick tokens. ``None`` means the engine's default."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None


class KvRouterOverride(msgspec.Struct, omit_defaults=True, frozen=True):
    """Per-request weights of the KV-aware cost (``None``: the router's setting).

    ``cost = overlap_weight * max(prefill_blocks - credit, 0) + decode_blocks`` with
    ``credit = device_credit * device_overlap + host_credit * host_overlap +
    disk_credit * disk_overlap``; ``temperature`` > 0 samples workers by softmax of
    their normalised costs instead of taking the cheapest."""

    overlap_weight: float | None = None
    device_credit: float | None = None
    host_credit: float | None = None
    disk_credit: float | None = None
    temperature: float | None = None


class RoutingHints(msgspec.Struct, omit_defaults=True):
    """Per-request routing overrides (the ``routing_strategy`` extension and friends)."""

    strategy: RoutingStrategy | None = None
    worker_id: str | None = None
    exclude_workers: list[str] = []
    kv: KvRouterOverride | None = None


class Request(msgspec.Struct, omit_defaults=True):
    """A tokenized generation request, published to the request stream.

    ``reply_to`` is a core NATS subject on which the worker streams ``Chunk`` and
    ``Error`` messages; ``request_id`` is also the JetStream de-duplication id, so a
    publisher that retries never creates a second request.

    ``batch_to``, when set, is a subject the requester also reads that takes
    ``ChunkBatch`` messages: the worker then sends this request's chunks there, in one
    message per engine step with those of every other request naming the same
    subject. A plain publisher leaves it empty and gets one message per chunk.
    """

    request_id: str
    model: str
    token_ids: list[int]
    reply_to: str
    sampling: SamplingOptions = msgspec.field(default_factory=SamplingOptions)
    routing: RoutingHints = msgspec.field(default_factory=RoutingHints)
    priority: int = 0
    created_ns: int = 0
    v: int = 1
    # False: the requester wants only the whole answer, so the worker sends one chunk
    # when it starts (naming itself) and one when it finishes, not one per step.
    stream: bool = True
    batch_to: str = ""
    # Set by a router that sends the request to a prefill worker: the decode worker
    # whose shard gets the descriptor ("": any decode worker of the model).
    decode_to: str = ""


class Usage(msgspec.Struct, omit_defaults=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class Chunk(msgspec.Struct, tag="chunk", tag_field="type", omit_defaults=True):
    """New tokens of one request. ``index`` is the position of the first token in the
    output, so a reader drops anything it has already seen after a redelivery.

    With ``sampling.logprobs`` set, ``logprobs`` has one log-probability per token in
    ``token_ids`` and ``top_logprobs`` per token the k most likely ``[token id,
    log-probability]`` pairs, most likely first; both are absent otherwise.
    """

    request_id: str
    index: int
    token_ids: list[int]
    worker_id: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: list[float] | None = None
    v: int = 1
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # Which run of the worker process sent it (with ``worker_id``, on a request's first
    # chunk): a reader never joins chunks of two runs into one answer.
    incarnation: str = ""


class Error(msgspec.Struct, tag="error", tag_field="type", omit_defaults=True):
    """A request failed; ``status`` is the HTTP status the frontend answers with."""

    request_id: str
    status: int
    message: str
    code: str = "internal_error"
    param: str | None = None
    v: int = 1


Response = Chunk | Error


class ChunkBatch(msgspec.Struct, tag="batch", tag_field="type", omit_defaults=True):
    """The chunks and errors of several requests that name the same
    ``Request.batch_to``, sent together (what one engine step produced for them), in
    the order they were produced. Built by :func:`join_responses`."""

    items: list[Chunk | Error]
    v: int = 1


Delivery = Chunk | Error | ChunkBatch  # what arrives on a requester's subscription

_BATCH_OPEN, _BATCH_CLOSE = b'{"type":"batch","items":[', b"]}"


def unbatch(delivery: Delivery) -> list[Response]:
    """The chunks and errors a message holds. An item of a newer schema version than
    this build reads is left out, not the whole batch: the other requests' chunks in
    it still count (the one left out shows as a gap in its own stream)."""
    if not isinstance(delivery, ChunkBatch):
        return [delivery]
    return [item for item in delivery.items if item.v <= SCHEMA_VERSION]


def join_responses(encoded: list[bytes]) -> bytes:
    """One ``ChunkBatch`` message holding already encoded ``Chunk``/``Error`` messages
    (spliced, not encoded again)."""
    return b"".join((_BATCH_OPEN, b",".join(encoded), _BATCH_CLOSE))


class Resend(msgspec.Struct, omit_defaults=True):
    """Ask whoever ran a request to send its chunks from output position ``from_index`` on
    again (to the request's reply subject): the requester saw a gap, or its connection
    dropped and some may be lost. Asked as a NATS request; only a worker that holds the
    request's chunks answers, with a ``ResendAck``."""

    request_id: str
    from_index: int = 0
    v: int = 1


class ResendAck(msgspec.Struct, omit_defaults=True):
    """A worker's answer to ``Resend``: it sent ``chunks`` chunks again (on the reply
    subject, before this answer); ``finished``: the request has ended there."""

    request_id: str
    worker_id: str
    incarnation: str = ""
    chunks: int = 0
    finished: bool = False
    v: int = 1


class Cancel(msgspec.Struct, omit_defaults=True):
    """Stop a request wherever it is: in a router's hands, queued or generating."""

    request_id: str
    reason: str = "client disconnected"
    v: int = 1


class Fingerprint(msgspec.Struct, frozen=True, omit_defaults=True):
    """What must match between a worker and whoever hashes blocks for it."""

    model: str
    block_size: int
    hash_scheme: str = "xxh3_64-seed1337-v1"
    # A digest of the tokenizer (token ids, hence block hashes, depend on it); "" unknown.
    tokenizer: str = ""


class Registration(msgspec.Struct, omit_defaults=True):
    """A live worker, kept in the workers bucket and re-put every heartbeat."""

    worker_id: str
    model: str
    fingerprint: Fingerprint
    work_subject: str
    capacity: int
    role: Role = "aggregated"
    engine: str = ""
    pid: int = 0
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    context_length: int = 0
    draining: bool = False
    v: int = 1
    # A new value under the same worker id is a new process: the old one is gone, and
    # so are the requests it was running.
    incarnation: str = ""


class Load(msgspec.Struct, omit_defaults=True):
    """A worker's load, put to the load bucket when it changes (and on heartbeat)."""

    worker_id: str
    active_requests: int = 0
    capacity: int = 0
    active_prefill_tokens: int = 0
    active_blocks: int = 0
    total_blocks: int = 0
    at: float = 0.0
    v: int = 1
    # Blocks held per tier of the KV block manager and each tier's capacity, by tier
    # name (device: cached and active blocks of the pool; host: G2).
    tier_blocks: dict[str, int] = {}
    tier_capacity: dict[str, int] = {}
    # Counters since the worker started, per tier below the device pool: blocks stored,
    # evicted and onboarded, bytes onboarded, seconds spent onboarding (disk: blocks
    # skipped and found corrupt too).
    tier_moves: dict[str, dict[str, float]] = {}
    # Disaggregated roles, counters since the worker started: a prefill worker's
    # descriptors published; a decode worker's claims, blocks and bytes READ, and
    # claims it prefilled itself, by cause (``fault.<cause>``).
    disagg: dict[str, int] = {}


Tier = Literal["device", "host", "disk"]
TIERS: tuple[str, ...] = Tier.__args__  # type: ignore[attr-defined]  # fastest first


class ResidencyBatch(msgspec.Struct, omit_defaults=True):
    """What changed in one worker's KV cache since its previous batch: blocks stored
    or moved to another tier, and blocks evicted for good. One message per publish
    interval on the worker's residency subject, whatever the number of blocks.

    ``instance`` tells a worker's incarnations apart (its start time in ns): a router
    that sees a newer instance forgets everything the older one held. ``seq`` counts
    the batches of one incarnation from 1, with no holes: a router that sees one skip
    missed some and reloads the worker's snapshot. Hashes are 8-byte little-endian
    sequence hashes, packed (base64 in JSON): see :func:`pack_hashes`."""

    worker_id: str
    instance: int
    seq: int
    stored: bytes = b""   # hashes now held (new, or in another tier than before)
    tiers: bytes = b""    # one byte per stored hash: its fastest tier, an index in TIERS
    removed: bytes = b""  # hashes no longer held in any tier
    v: int = 1


class ResidencySnapshot(msgspec.Struct, omit_defaults=True):
    """Everything one worker holds after its batch ``seq``: the object a router loads
    before it replays the batches after it. ``stream_seq`` is the residency stream's
    sequence at or after that batch, where a router that loaded this snapshot starts
    reading."""

    worker_id: str
    instance: int
    seq: int
    stream_seq: int
    hashes: bytes = b""
    tiers: bytes = b""
    v: int = 1


def pack_hashes(hashes: Iterable[int]) -> bytes:
    """Block hashes (unsigned 64-bit) as 8-byte little-endian words."""
    words = array("Q", hashes)
    if sys.byteorder == "big":
        words.byteswap()
    return words.tobytes()


def unpack_hashes(data: bytes) -> array[int]:
    """The inverse of :func:`pack_hashes`."""
    if len(data) % 8:
        raise ProtocolError(f"packed hashes of {len(data)} bytes (not whole 8-byte words)")
    words = array("Q")
    words.frombytes(data)
    if sys.byteorder == "big":
        words.byteswap()
    return words


class KVDescriptor(msgspec.Struct, omit_defaults=True):
    """KV blocks that wait in one worker's host tier for another to READ over NIXL:
    their chained hashes in prompt order, each one's address in the lender's registered
    buffer, and the lease that keeps them there. The reader finds the lender's agent
    metadata by ``agent``, READs the blocks it lacks in one transfer that notifies
    the lender with :class:`KVReadDone`, and must not READ after ``lease_expires``."""

    request_id: str
    agent: str            # the lender's NIXL agent name
    hashes: bytes         # pack_hashes: the blocks' chained hashes, in prompt order
    addrs: list[int]      # addrs[i]: where block i starts in the lender's memory
    block_bytes: int
    kv: str               # digest of model, block shape and dtype; a reader must match
    lease: str
    lease_expires: float  # unix time
    first_token: int = -1  # the prefill's sampled token, when a prefill lent the blocks
    v: int = 1
    # What a prefill worker hands a decode worker: the request itself, each block's
    # tier at the lender (an index in TIERS, one byte per block), who prefilled it.
    request: Request | None = None
    tiers: bytes = b""
    prefill_worker: str = ""


class KVReadDone(msgspec.Struct, omit_defaults=True):
    """Sent with a READ of lent blocks (a NIXL notification): the lease can end."""

    lease: str
    v: int = 1


def now_ns() -> int:
    return time.time_ns()


T = TypeVar("T")


class Codec(Generic[T]):
    """A JSON encoder plus a typed decoder for one payload type."""

    def __init__(self, kind: type[T] | object) -> None:
        self._enc = msgspec.json.Encoder()
        self._dec: msgspec.json.Decoder[T] = msgspec.json.Decoder(kind)  # type: ignore[arg-type]
        self._name = getattr(kind, "__name__", str(kind))

    def encode(self, obj: T) -> bytes:
        return self._enc.encode(obj)

    def decode(self, data: bytes) -> T:
        try:
            obj = self._dec.decode(data)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"malformed {self._name} message: {exc}") from exc
        version = getattr(obj, "v", SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise ProtocolError(
                f"{self._name} has schema version {version}; "
                f"this build reads up to {SCHEMA_VERSION}"
            )
        return obj


REQUEST: Codec[Request] = Codec(Request)
RESPONSE: Codec[Delivery] = Codec(Delivery)
CANCEL: Codec[Cancel] = Codec(Cancel)
RESEND: Codec[Resend] = Codec(Resend)
RESEND_ACK: Codec[ResendAck] = Codec(ResendAck)
REGISTRATION: Codec[Registration] = Codec(Registration)
LOAD: Codec[Load] = Codec(Load)
RESIDENCY_BATCH: Codec[ResidencyBatch] = Codec(ResidencyBatch)
RESIDENCY_SNAPSHOT: Codec[ResidencySnapshot] = Codec(ResidencySnapshot)
KV_DESCRIPTOR: Codec[KVDescriptor] = Codec(KVDescriptor)
KV_READ_DONE: Codec[KVReadDone] = Codec(KVReadDone)
