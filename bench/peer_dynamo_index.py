"""Baseline micro-benchmark of NVIDIA Dynamo's KV-router index (its Rust ``RadixTree``).

Measures, on Dynamo's in-process ``dynamo.llm.RadixTree`` (= ``dynamo._core.RadixTree``):

* build   - wall seconds (and blocks/s) to ``apply_event`` one "stored" event per chain;
            events are JSON-encoded before the clock starts (encode time is reported apart);
* queries - per-call latency of ``find_matches`` (``time.perf_counter_ns``; p50/p99/mean us);
            every query's score for the owning worker is asserted to equal the prefix length k;
* removal - wall seconds of ``remove_worker`` for worker 0;
* peak RSS of the process (the tree lives in a background Rust thread of this process).

Workload (reproduce it exactly on the other side): ``rng = np.random.default_rng(seed)``;
chains of L=256 blocks (a 4096-token prompt at block size 16); C = B // L chains; chain c
belongs to worker c % W; per chain, in order, ``local = rng.integers(1, 2**62, L)`` then
``seq = rng.integers(1, 2**62, L)``.  Chain c is ONE stored event for its worker::

    {"event_id": c, "data": {"stored": {"parent_hash": null,
        "blocks": [{"block_hash": seq[i], "tokens_hash": local[i]}, ...]}}}

(serde_json ``KvCacheEvent`` bytes; ``find_matches`` takes LOCAL (tokens) hashes).  After the
build, Q queries with the same rng: ``c = rng.integers(C)``, ``k = rng.integers(0, L + 1)``,
query = local[c][:k] + ``rng.integers(1, 2**62, L - k)``.

Run (Dynamo venv; prints one JSON object on stdout)::

    DYN_LOG=error .peers/dynamo/bin/python bench/peer_dynamo_index.py --blocks 100000
    DYN_LOG=error .peers/dynamo/bin/python bench/peer_dynamo_index.py --blocks 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from importlib import metadata

import numpy as np

os.environ.setdefault("DYN_LOG", "error")

from dynamo.llm import RadixTree  # after DYN_LOG is set

L = 256  # blocks per chain: 4096 tokens / block size 16


def rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def score_for(scores: dict, worker: int) -> int:
    """Score of ``worker``; Dynamo 1.6 keys scores by (worker_id, dp_rank)."""
    total = 0
    for key, val in scores.items():
        wid = key[0] if isinstance(key, tuple) else key
        if wid == worker:
            total = max(total, int(val))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=100_000, help="total blocks B")
    ap.add_argument("--workers", type=int, default=8, help="workers W")
    ap.add_argument("--queries", type=int, default=2000, help="queries Q")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    n_chains = args.blocks // L
    if n_chains < 1:
        sys.exit("--blocks must be at least 256")
    w = args.workers
    rss_start = rss_now_mib()

    # Workload generation + JSON encoding (not timed as build).
    t0 = time.perf_counter()
    locals_ = np.empty((n_chains, L), dtype=np.int64)
    events: list[bytes] = []
    for c in range(n_chains):
        local = rng.integers(1, 2**62, L)
        seq = rng.integers(1, 2**62, L)
        locals_[c] = local
        blocks = [
            {"block_hash": s, "tokens_hash": t}
            for s, t in zip(seq.tolist(), local.tolist(), strict=True)
        ]
        ev = {"event_id": c, "data": {"stored": {"parent_hash": None, "blocks": blocks}}}
        events.append(json.dumps(ev, separators=(",", ":")).encode())
    encode_s = time.perf_counter() - t0
    event_bytes = sum(len(e) for e in events)

    # (a) build
    tree = RadixTree()
    rss_before_build = rss_now_mib()
    t0 = time.perf_counter()
    for c, ev in enumerate(events):
        tree.apply_event(c % w, ev)
    build_s = time.perf_counter() - t0
    del events
    rss_after_build = rss_now_mib()
    n_blocks = n_chains * L

    # (b) queries
    queries: list[tuple[int, int, list[int]]] = []
    for _ in range(args.queries):
        c = int(rng.integers(n_chains))
        k = int(rng.integers(0, L + 1))
        fresh = rng.integers(1, 2**62, L - k)
        queries.append((c, k, locals_[c, :k].tolist() + fresh.tolist()))
    lat_ns = np.empty(len(queries), dtype=np.int64)
    results = []
    for i, (_, _, q) in enumerate(queries):
        t = time.perf_counter_ns()
        r = tree.find_matches(q)
        lat_ns[i] = time.perf_counter_ns() - t
        results.append(r)
    checked = 0
    for (c, k, _), r in zip(queries, results, strict=True):
        got = score_for(r.scores, c % w)
        assert got == k, f"chain {c} worker {c % w}: score {got} != k {k}"
        checked += 1
    sample = [
        {"chain": c, "k": k, "scores": {str(key): v for key, v in r.scores.items()}}
        for (c, k, _), r in list(zip(queries, results, strict=True))[:3]
    ]
    lat_us = lat_ns / 1e3

    # (c) removal of worker 0
    t0 = time.perf_counter()
    tree.remove_worker(0)
    remove_s = time.perf_counter() - t0
    after = tree.find_matches(locals_[0].tolist()).scores
    assert score_for(after, 0) == 0, f"worker 0 still scored after removal: {after}"

    out = {
        "bench": "peer_dynamo_index",
        "dynamo_version": metadata.version("ai-dynamo"),
        "dynamo_runtime_version": metadata.version("ai-dynamo-runtime"),
        "args": {
            "blocks": args.blocks,
            "workers": w,
            "queries": args.queries,
            "seed": args.seed,
            "chain_len": L,
            "chains": n_chains,
        },
        "event_format": "serde_json KvCacheEvent {event_id,data:{stored:{parent_hash,blocks}}}",
        "query_hash_kind": "local (tokens_hash)",
        "encode": {"seconds": encode_s, "event_bytes": event_bytes},
        "build": {
            "blocks": n_blocks,
            "events": n_chains,
            "seconds": build_s,
            "blocks_per_s": n_blocks / build_s,
            "events_per_s": n_chains / build_s,
        },
        "find_matches_us": {
            "p50": float(np.percentile(lat_us, 50)),
            "p99": float(np.percentile(lat_us, 99)),
            "mean": float(lat_us.mean()),
            "max": float(lat_us.max()),
            "checked_score_eq_k": checked,
            "sample": sample,
        },
        "remove_worker": {"worker": 0, "blocks": (n_chains + w - 1) // w * L, "seconds": remove_s},
        "rss_mib": {
            "start": rss_start,
            "before_build": rss_before_build,
            "after_build": rss_after_build,
            "tree_delta_approx": rss_after_build - rss_before_build,
            "peak": peak_rss_mib(),
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
