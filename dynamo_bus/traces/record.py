"""``dynamo-bus record``: the JetStream request log written out as a Mooncake trace.

Every request a frontend or client submits is stored in the request log
(``Names.request_stream``, kept a day), so the traffic of a deployment can be taken
afterwards and replayed (``dynamo-bus replay``) or simulated (``dynamo-bus simulate``).
The log is read with an ordered consumer: ephemeral, in memory, no acks, so recording
leaves nothing behind and never disturbs the routers' durable consumer.

Each request becomes one trace line: ``timestamp`` (ms since the first recorded
request, from the request's ``created_ns``, else the time the log stored it),
``input_length`` (prompt tokens), ``output_length`` and ``hash_ids``. The log holds what
was *asked*, not what was produced: ``output_length`` is the request's ``max_tokens``,
and a request that stopped early at EOS or a stop string is replayed at full length.

``hash_ids`` has one id per ``block_size`` (512) prompt tokens, the last block possibly
partial; each id stands for its block and the whole prefix before it (the chained
sequence hash of ``dynamo_bus.hashing``, a trailing partial block chained too),
renumbered 0, 1, 2, ... in order of first appearance, so equal prefixes get equal
leading ids and nothing of the prompt can be read back from them. ``--with-tokens``
adds the prompt's ``token_ids`` (a replay then sends the real prompt). ``model`` is
always written.

A request appears in the log more than once when a draining worker hands it back to
the routers; it is recorded once (the first copy, by request id).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from dynamo_bus.bus.messages import REQUEST
from dynamo_bus.bus.subjects import Names
from dynamo_bus.errors import ConfigError, ProtocolError
from dynamo_bus.hashing import block_hash, chain_hash, sequence_hashes
from dynamo_bus.traces.mooncake import TRACE_BLOCK_SIZE, TraceRequest, write_trace


def stop_on_signal() -> asyncio.Event:
    """An event set by the first SIGINT/SIGTERM; a second one interrupts as usual. Off
    the main thread (no signals there) the event is only set by the caller."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def _first() -> None:
        print("\nstopping (Ctrl-C again to abort)", file=sys.stderr)
        stop.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    with contextlib.suppress(RuntimeError, ValueError, NotImplementedError):
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _first)
    return stop


def prefix_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """One chained hash per ``block_size`` tokens, a trailing partial block included."""
    out = sequence_hashes(token_ids, block_size)
    tail = token_ids[len(out) * block_size:]
    if tail:
        local = block_hash(tail)
        out.append(chain_hash(out[-1], local) if out else local)
    return out


@dataclass
class _Logged:
    at_ns: int
    input_length: int
    output_length: int
    hashes: list[int]
    model: str
    token_ids: list[int] | None


async def _connect(url: str) -> nats.NATS:
    async def _quiet(exc: Exception) -> None:  # failures surface as exceptions below
        pass

    try:
        return await nats.connect(url, name="dynamo-bus-record", connect_timeout=5,
                                  max_reconnect_attempts=5, reconnect_time_wait=0.5,
                                  error_cb=_quiet)
    except Exception as exc:
        raise ConfigError(f"cannot connect to NATS at {url} (--nats-url): {exc}") from exc


async def _subscribe(js: JetStreamContext, url: str, names: Names, *, model: str | None,
                     since: float | None) -> tuple[JetStreamContext.PushSubscription, int]:
    """An ordered consumer on the log from ``since`` seconds ago (else its start), and the
    log's last sequence number when it was made."""
    try:
        info = await js.stream_info(names.request_stream)
    except NotFoundError:
        raise ConfigError(f"no request log ({names.request_stream}) on {url}: nothing was "
                          f"served in namespace {names.namespace!r} (--namespace)") from None
    config = None
    if since is not None:
        start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=since)
        config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.BY_START_TIME,
                                       opt_start_time=start)
    subject = names.request_subject(model) if model else names.request_subjects
    sub = await js.subscribe(subject, stream=names.request_stream, ordered_consumer=True,
                             config=config)
    return sub, info.state.last_seq


async def _read_messages(sub: JetStreamContext.PushSubscription, end_seq: int, *,
                         follow: bool, block_size: int, with_tokens: bool,
                         stop: asyncio.Event) -> tuple[list[_Logged], int]:
    """Read ``sub`` up to ``end_seq`` (with ``follow``: until ``stop``); the first copy of
    each request, and how many messages were undecodable."""
    seen: dict[str, _Logged] = {}
    skipped = 0
    while not stop.is_set():
        try:
            msg = await sub.next_msg(timeout=0.5)
        except nats.errors.TimeoutError:
            if not follow and (await sub.consumer_info()).num_pending == 0:
                break
            continue
        except nats.errors.Error as exc:  # the server went away: keep what we have
            print(f"stopped reading the request log: {exc}", file=sys.stderr)
            break
        md = msg.metadata
        try:
            req = REQUEST.decode(msg.data)
        except ProtocolError:
            skipped += 1
        else:
            if req.request_id not in seen:
                at = req.created_ns or int(md.timestamp.timestamp() * 1e9)
                seen[req.request_id] = _Logged(
                    at, len(req.token_ids), req.sampling.max_tokens,
                    prefix_block_hashes(req.token_ids, block_size), req.model,
                    req.token_ids if with_tokens else None)
        if not follow and (md.sequence.stream >= end_seq or md.num_pending == 0):
            break
    return list(seen.values()), skipped


async def _read_log(url: str, names: Names, *, model: str | None, since: float | None,
                    follow: bool, block_size: int, with_tokens: bool,
                    stop: asyncio.Event) -> tuple[list[_Logged], int]:
    """The requests in the log (first copy of each), and how many messages were skipped
    as undecodable."""
    nc = await _connect(url)
    try:
        js = nc.jetstream(timeout=10)
        sub, end_seq = await _subscribe(js, url, names, model=model, since=since)
        try:
            return await _read_messages(sub, end_seq, follow=follow, block_size=block_size,
                                        with_tokens=with_tokens, stop=stop)
        finally:  # an ephemeral consumer would go by itself after a while; go now
            with contextlib.suppress(Exception):
                name = (await sub.consumer_info()).name
                await sub.unsubscribe()
                await js.delete_consumer(names.request_stream, name)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def to_trace(logged: list[_Logged]) -> list[TraceRequest]:
    """Trace lines in time order, hashes renumbered in order of first appearance."""
    logged = sorted(logged, key=lambda r: r.at_ns)
    t0 = logged[0].at_ns if logged else 0
    ids: dict[int, int] = {}
    return [TraceRequest(timestamp=round((r.at_ns - t0) / 1e6), input_length=r.input_length,
                         output_length=max(r.output_length, 1),
                         hash_ids=[ids.setdefault(h, len(ids)) for h in r.hashes],
                         token_ids=r.token_ids, model=r.model)
            for r in logged if r.input_length > 0]


async def record(out: str | Path, url: str, *, namespace: str = "dynamo",
                 model: str | None = None, since: float | None = None, follow: bool = False,
                 block_size: int = TRACE_BLOCK_SIZE, with_tokens: bool = False,
                 stop: asyncio.Event | None = None) -> int:
    """Write the request log at ``url`` to ``out`` as a Mooncake trace; returns the
    number of requests written. Stops at the end of the log as it was at the start, or
    with ``follow`` when ``stop`` is set (what was read so far is written either way)."""
    if block_size < 1:
        raise ConfigError(f"--block-size must be positive, got {block_size}")
    if since is not None and since < 0:
        raise ConfigError(f"--since must be seconds ago (>= 0), got {since}")
    stop = stop or asyncio.Event()
    if follow:
        print("recording new requests too; Ctrl-C to stop and write", file=sys.stderr)
    logged, skipped = await _read_log(url, Names(namespace), model=model, since=since,
                                      follow=follow, block_size=block_size,
                                      with_tokens=with_tokens, stop=stop)
    if skipped:
        print(f"skipped {skipped} undecodable messages", file=sys.stderr)
    return write_trace(out, to_trace(logged))


async def record_main(out: str, url: str, *, namespace: str, model: str | None,
                      since: float | None, follow: bool, block_size: int,
                      with_tokens: bool) -> int:
    """``record`` with Ctrl-C ending the reading (the file is still written)."""
    n = await record(out, url, namespace=namespace, model=model, since=since, follow=follow,
                     block_size=block_size, with_tokens=with_tokens, stop=stop_on_signal())
    print(f"wrote {n} requests to {out}")
    return n
