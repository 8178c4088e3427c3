"""Mooncake-format request traces: read, write, turn into tokens, and their cache bound.

One JSON object per line (the FAST'25 Mooncake release, also what Dynamo and aiperf
replay): ``timestamp`` (ms since the first request), ``input_length``,
``output_length`` (tokens) and ``hash_ids``, one id per ``trace_block_size`` (512)
prompt tokens, each standing for its block *and everything before it*, so equal
leading ids mean a shared prefix. ``dynamo-bus record`` may add ``token_ids`` (the
real prompt) and ``model``.

A trace without token ids is replayed with synthetic tokens: each id becomes
``trace_block_size`` pseudo-random tokens drawn from the id alone, so equal ids give
equal tokens, and the engines' own block hashes (any block size dividing
``trace_block_size``) see exactly the trace's reuse.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import msgspec
import numpy as np

from dynamo_bus.errors import ConfigError

TRACE_BLOCK_SIZE = 512


class TraceRequest(msgspec.Struct, omit_defaults=True):
    timestamp: float
    input_length: int
    output_length: int
    hash_ids: list[int] = []
    token_ids: list[int] | None = None
    model: str | None = None


_DECODER = msgspec.json.Decoder(TraceRequest)
_ENCODER = msgspec.json.Encoder()


def read_trace(path: str | Path, *, limit: int | None = None) -> list[TraceRequest]:
    """The requests of a JSONL trace, in timestamp order; a malformed line is a
    ConfigError naming the file and line."""
    out: list[TraceRequest] = []
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    req = _DECODER.decode(line)
                except msgspec.DecodeError as exc:
                    raise ConfigError(f"{path}:{lineno}: not a Mooncake trace line: {exc}") \
                        from exc
                if req.input_length < 1 or req.output_length < 1:
                    raise ConfigError(f"{path}:{lineno}: input_length and output_length "
                                      "must be positive")
                if req.token_ids is None and not req.hash_ids:
                    raise ConfigError(f"{path}:{lineno}: needs hash_ids or token_ids")
                out.append(req)
                if limit is not None and len(out) >= limit:
                    break
    except OSError as exc:
        raise ConfigError(f"cannot read trace {path}: {exc}") from exc
    out.sort(key=lambda r: r.timestamp)
    return out


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> int:
    n = 0
    with open(path, "wb") as f:
        for req in requests:
            f.write(_ENCODER.encode(req) + b"\n")
            n += 1
    return n


_MUL = np.uint64(0x9E3779B97F4A7C15)
_POS = np.arange(TRACE_BLOCK_SIZE, dtype=np.uint64) * np.uint64(0xBF58476D1CE4E5B9)


def synth_tokens(req: TraceRequest, vocab_size: int,
                 trace_block_size: int = TRACE_BLOCK_SIZE) -> np.ndarray:
    """The prompt of ``req``: its recorded token ids, or ``input_length`` tokens drawn
    from its hash ids (see the module docstring)."""
    if req.token_ids is not None:
        return np.asarray(req.token_ids, dtype=np.int64)
    if len(req.hash_ids) * trace_block_size < req.input_length:
        raise ConfigError(f"a request of {req.input_length} tokens has only "
                          f"{len(req.hash_ids)} hash ids of {trace_block_size} tokens")
    ids = np.asarray(req.hash_ids, dtype=np.uint64)
    pos = _POS[:trace_block_size] if trace_block_size <= TRACE_BLOCK_SIZE else \
        np.arange(trace_block_size, dtype=np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
    with np.errstate(over="ignore"):  # wrapping multiply: a cheap integer mix
        mixed = (ids[:, None] + np.uint64(1)) * _MUL + pos[None, :]
        mixed ^= mixed >> np.uint64(29)
        mixed *= _MUL
        mixed ^= mixed >> np.uint64(32)
    tokens = (mixed % np.uint64(vocab_size)).astype(np.int64).reshape(-1)
    return tokens[:req.input_length]


def reuse_bound(requests: Iterable[TraceRequest], block_size: int = 16,
                trace_block_size: int = TRACE_BLOCK_SIZE) -> float:
    """Share of prompt tokens an infinite prefix cache would reuse: each request's
    leading hash ids seen in any earlier request, in full ``block_size`` blocks, and
    never the whole prompt (its last token is always computed, as in the engines)."""
    seen: set[int] = set()
    reused = total = 0
    for req in requests:
        k = 0
        for h in req.hash_ids:
            if h not in seen:
                break
            k += 1
        cap = (req.input_length - 1) // block_size * block_size
        reused += min(k * trace_block_size, cap)
        total += req.input_length
        seen.update(req.hash_ids)
    return reused / total if total else 0.0


def summary_line(requests: list[TraceRequest]) -> str:
    if not requests:
        return "empty trace"
    span = (requests[-1].timestamp - requests[0].timestamp) / 1000
    isl = sum(r.input_length for r in requests) / len(requests)
    osl = sum(r.output_length for r in requests) / len(requests)
    return (f"{len(requests)} requests over {span:.0f} s, mean input {isl:,.0f} tokens, "
            f"mean output {osl:,.0f}")

