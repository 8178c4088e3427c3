"""The router's residency index: decision latency and update rate at 100k and 1M indexed
blocks, and the lag from a residency write to the router's index.

Part 1, in process, the workload of ``bench/peer_dynamo_index.py`` (8 workers, chains of
256 blocks, i.e. 4,096-token prompts at block size 16; queries share a random leading
part of a chain): our ``ResidencyIndex`` against NVIDIA Dynamo 1.6.1's Rust radix tree
(its Python binding, run in the Dynamo venv in the same invocation). Figures: build rate
(blocks/s), prefix-match latency, and our whole kv_aware decision (candidates, overlap,
cost, tie-break) with and without hashing the 4,096-token prompt.

Part 2, over a real nats-server on 127.0.0.1: a worker's ``ResidencyPublisher`` publishes
blocks (event batches) while a router's ``ResidencyWatcher`` follows them; new watchers
then rebuild the index (what a restarted router does), once before the worker's first
snapshot (from the batches alone) and once after it. The build at ``--before`` (one KV
message per block) runs the same measurement in a child, side by side. Baseline: the
same number of messages through raw nats-py core pub/sub. Lag: single changes at a
steady rate, from the engine's report to visible in the index.

    python bench/router_index.py            # writes bench/results/router_index.md/.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from checkout import checkout, head  # noqa: E402

from dynamo_bus.bus.connection import open_bus  # noqa: E402
from dynamo_bus.bus.messages import Fingerprint, Load, Registration, Request  # noqa: E402
from dynamo_bus.bus.natsserver import EmbeddedNats  # noqa: E402
from dynamo_bus.config import Config  # noqa: E402
from dynamo_bus.hashing import HASH_SCHEME, sequence_hashes  # noqa: E402
from dynamo_bus.routing.kv_index import ResidencyIndex  # noqa: E402
from dynamo_bus.routing.policy import RoutingPolicy  # noqa: E402
from dynamo_bus.routing.residency import ResidencyPublisher  # noqa: E402
from dynamo_bus.routing.residency_watch import ResidencyWatcher  # noqa: E402
from dynamo_bus.traces.report import percentile  # noqa: E402

DYNAMO_PY = ROOT / ".peers" / "dynamo" / "bin" / "python"
W, L, BS, Q = 8, 256, 16, 2000


def workload(total: int, seed: int = 0) -> tuple[list[np.ndarray], np.random.Generator]:
    """Chains of sequence hashes, drawn as the Dynamo peer draws them (local, then seq)."""
    rng = np.random.default_rng(seed)
    chains = []
    for _ in range(total // L):
        rng.integers(1, 2**62, L)  # the local hashes Dynamo's tree keys on
        chains.append(rng.integers(1, 2**62, L))
    return chains, rng


class _View:
    """Eight idle workers, as the registry would list them."""

    def __init__(self) -> None:
        self.regs = [Registration(worker_id=f"w{i}", model="m", work_subject="",
                                  capacity=256, fingerprint=Fingerprint("m", BS, HASH_SCHEME))
                     for i in range(W)]

    def workers(self, model: str | None = None) -> list[Registration]:
        return self.regs

    def load(self, worker_id: str) -> Load | None:
        return None


def stats_us(ns: list[int]) -> dict[str, float]:
    us = [n / 1000 for n in ns]
    return {"p50": percentile(us, 50), "p99": percentile(us, 99), "mean": sum(us) / len(us)}


def in_process(total: int) -> dict[str, Any]:
    chains, rng = workload(total)
    index = ResidencyIndex()
    total = len(chains) * L  # whole chains
    t = time.perf_counter()
    for c, chain in enumerate(chains):
        wid = f"w{c % W}"
        for h in chain.tolist():
            index.apply(wid, h, "device")
    build = time.perf_counter() - t
    policy = RoutingPolicy(_View(), "kv_aware", block_size=BS, index=index)
    workers = [f"w{i}" for i in range(W)]
    match_ns, decide_ns, full_ns = [], [], []
    prompt = list(range(L * BS))
    for q in range(Q):
        c, k = int(rng.integers(len(chains))), int(rng.integers(0, L + 1))
        query = chains[c][:k].tolist() + rng.integers(1, 2**62, L - k).tolist()
        t0 = time.perf_counter_ns()
        got = index.overlaps(query, workers)
        match_ns.append(time.perf_counter_ns() - t0)
        assert got[f"w{c % W}"][0] == k
        req = Request(request_id=f"q{q}", model="m", token_ids=prompt, reply_to="")
        t0 = time.perf_counter_ns()
        policy.pick(req, policy.candidates(req), query)
        decide_ns.append(time.perf_counter_ns() - t0)
        t0 = time.perf_counter_ns()
        policy.pick(req, policy.candidates(req), sequence_hashes(prompt, BS))
        full_ns.append(time.perf_counter_ns() - t0)
    t = time.perf_counter()
    index.remove_worker("w0")
    return {"blocks": total, "build_s": build,
            "build_blocks_per_s": total / build, "match_us": stats_us(match_ns),
            "decision_us": stats_us(decide_ns), "decision_with_hashing_us": stats_us(full_ns),
            "remove_worker_s": time.perf_counter() - t,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def dynamo_peer(total: int) -> dict[str, Any] | None:
    if not DYNAMO_PY.exists():
        return None
    out = subprocess.run([str(DYNAMO_PY), str(ROOT / "bench" / "peer_dynamo_index.py"),
                          "--blocks", str(total)], capture_output=True, text=True,
                         check=True, timeout=900, env={**os.environ, "DYN_LOG": "error"})
    return json.loads(out.stdout)


class FakeResidencySource:
    """A fake of ``ResidencySource`` (the engine side of a publisher): hands out a
    prepared batch of residency changes once."""

    def __init__(self) -> None:
        self.pending: dict[int, str | None] = {}

    def residency_changes(self) -> dict[int, str | None]:
        out, self.pending = self.pending, {}
        return out


async def over_nats(total: int, url: str) -> dict[str, Any]:
    cfg = Config(nats_url=url, namespace=f"b{total}")
    bus = await open_bus(cfg, url, name="bench-worker")
    router_bus = await open_bus(cfg, url, name="bench-router")
    source = FakeResidencySource()
    pub = ResidencyPublisher(bus, source, "w0", instance=1)
    pub._stopping = True  # ticks are driven below, not by its own loop
    await pub.start()
    watcher = ResidencyWatcher(router_bus)
    await watcher.start()
    chains, _ = workload(total, seed=1)
    hashes = np.concatenate(chains).tolist()
    total = len(hashes)  # whole chains
    t = time.perf_counter()
    for i in range(0, len(hashes), 10_000):  # the engine hands out changes in batches
        source.pending = dict.fromkeys(hashes[i:i + 10_000], "device")
        await pub.publish_changes()
    published = time.perf_counter() - t
    while watcher.index.blocks_of("w0") < total:  # noqa: ASYNC110 (polls another task's work)
        await asyncio.sleep(0.01)
    followed = time.perf_counter() - t
    buses = [bus, router_bus]
    watchers = [watcher]

    async def rebuild() -> float:
        """A restarted router: snapshots, then the batches after them."""
        fresh_bus = await open_bus(cfg, url, name="bench-router-2")
        fresh = ResidencyWatcher(fresh_bus)
        t = time.perf_counter()
        await fresh.start(wait=600)
        took = time.perf_counter() - t
        assert fresh.index.blocks_of("w0") == total
        buses.append(fresh_bus)
        watchers.append(fresh)
        return took

    from_batches = await rebuild()  # the worker's snapshot is still the empty one
    t = time.perf_counter()
    await pub.write_snapshot()
    snapshot_s = time.perf_counter() - t
    rebuilt = await rebuild()
    # lag: one change at a time, 200 a second, from the engine's report to the index
    seen: dict[int, float] = {}
    apply_batch = watcher.index.apply_batch

    def timed(worker_id: str, instance: int, stored: Any, ranks: Any, removed: Any) -> bool:
        now = time.perf_counter()
        stored = list(stored)
        for h in stored:
            seen.setdefault(h, now)
        return apply_batch(worker_id, instance, stored, ranks, removed)

    watcher.index.apply_batch = timed  # type: ignore[method-assign]
    sent: dict[int, float] = {}
    for i in range(1000):
        h = 2**62 + i
        source.pending = {h: "device"}
        sent[h] = time.perf_counter()
        await pub.publish_changes()
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.5)
    lags = [int((seen[h] - sent[h]) * 1e9) for h in sent if h in seen]
    await pub.stop()
    for w in watchers:
        await w.stop()
    for b in buses:
        await b.close()
    return {"publish_s": published, "publish_blocks_per_s": total / published,
            "follow_s": followed, "follow_blocks_per_s": total / followed,
            "rebuild_from_batches_s": from_batches, "snapshot_write_s": snapshot_s,
            "snapshot_bytes": pub.snapshot_bytes,
            "rebuild_s": rebuilt, "rebuild_blocks_per_s": total / rebuilt,
            "batches": pub.batches, "lag_us": stats_us(lags), "lag_samples": len(lags)}


BEFORE_CHILD = """
import asyncio, json, sys, tempfile
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/bench"]
import router_index as r
from dynamo_bus.bus.natsserver import EmbeddedNats
with tempfile.TemporaryDirectory() as tmp:
    server = EmbeddedNats(Path(tmp) / "js")
    url = server.start()
    try:
        print(json.dumps(asyncio.run(r.over_nats(int(sys.argv[2]), url))))
    finally:
        server.stop()
"""


def before_nats(total: int, ref: str) -> dict[str, Any]:
    """The same over-NATS measurement with the build at ``ref`` (one KV message per
    block), in a child with that build's code."""
    with checkout(ref) as tree:
        out = subprocess.run([sys.executable, "-c", BEFORE_CHILD, str(tree), str(total)],
                             capture_output=True, text=True, timeout=1800, check=True,
                             env={**os.environ, "PYTHONPATH": str(tree)})
    return json.loads(out.stdout.strip().splitlines()[-1])


async def raw_nats(total: int, url: str) -> dict[str, Any]:
    """Baseline: the same number of small messages through core NATS, no JetStream."""
    import nats

    pub, sub = await nats.connect(url), await nats.connect(url)
    got = 0
    done = asyncio.Event()

    async def cb(msg: Any) -> None:
        nonlocal got
        got += 1
        if got == total:
            done.set()

    await sub.subscribe("raw.>", cb=cb)
    await sub.flush()
    payload = b'{"tier":"device","instance":1}'
    t = time.perf_counter()
    for i in range(total):
        await pub.publish(f"raw.w0.{i:016x}", payload)
    await pub.flush()
    await done.wait()
    elapsed = time.perf_counter() - t
    await pub.close()
    await sub.close()
    return {"s": elapsed, "msgs_per_s": total / elapsed}


def render(results: dict[str, Any]) -> str:
    lines = ["# Router index: decision latency, update rate, lag", "",
             f"Command: `python bench/router_index.py` · {date.today()} · commit "
             f"{results.get('commit', '?')} · "
             f"{platform.machine()}, {os.cpu_count()} cores (shared, noisy) · "
             "single runs; medians of 2,000 queries.", "",
             "## In process: our index vs Dynamo 1.6.1's radix tree", "",
             f"{W} workers; 4,096-token prompts (256 blocks of 16); a query shares a "
             "uniformly random leading part of one cached prompt.", "",
             "| indexed blocks | index | build blocks/s | match p50 µs | match p99 µs | "
             "decision p50 µs | decision p99 µs | decision + hashing p50 / p99 µs | "
             "remove a worker s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for total, r in results["sizes"].items():
        ours = r["ours"]
        lines.append(
            f"| {int(total):,} | dynamo-bus `ResidencyIndex` | {ours['build_blocks_per_s']:,.0f} |"
            f" {ours['match_us']['p50']:.0f} | {ours['match_us']['p99']:.0f} |"
            f" {ours['decision_us']['p50']:.0f} | {ours['decision_us']['p99']:.0f} |"
            f" {ours['decision_with_hashing_us']['p50']:.0f} /"
            f" {ours['decision_with_hashing_us']['p99']:.0f} |"
            f" {ours['remove_worker_s']:.2f} | {ours['peak_rss_mb']:,.0f} |")
        d = r.get("dynamo")
        if d:
            m = d["find_matches_us"]
            lines.append(
                f"| {int(total):,} | Dynamo `RadixTree` (Rust) |"
                f" {d['build']['blocks_per_s']:,.0f} | {m['p50']:.0f} | {m['p99']:.0f} |"
                f" — | — | — | {d['remove_worker']['seconds']:.2f} |"
                f" {d['rss_mib']['peak']:,.0f} |")
    before = results.get("before_ref", "before")
    lines += ["", "## Over NATS: residency from a worker to routers", "",
              f"A worker publishes the blocks (10,000 changes per tick); a router follows; "
              f"new routers rebuild the index. Before: the build at {before} (one JetStream "
              "KV message per block; a new router reads the bucket). After: one event batch "
              "per tick on the residency stream plus a snapshot per worker (a new router "
              "loads the snapshot, then the batches after it). Same run, same nats-server "
              "binary.", "",
              "| blocks | build | publish blocks/s (worker) | followed by a router, blocks/s "
              "| rebuilt by a new router, s (blocks/s) | raw core NATS msgs/s (baseline) |",
              "|---|---|---|---|---|---|"]
    for total, r in results["sizes"].items():
        raw = r["raw_nats"]
        for label, n in (("before", r.get("nats_before")), ("after", r["nats"])):
            if not n:
                continue
            rebuilt = f"{n['rebuild_s']:.2f} ({n['rebuild_blocks_per_s']:,.0f})"
            if "rebuild_from_batches_s" in n:
                rebuilt += (f"; from batches alone, before the worker's first snapshot: "
                            f"{n['rebuild_from_batches_s']:.2f}")
            lines.append(f"| {int(total):,} | {label} | {n['publish_blocks_per_s']:,.0f} | "
                         f"{n['follow_blocks_per_s']:,.0f} | {rebuilt} | "
                         f"{raw['msgs_per_s']:,.0f} |")
    lines += ["", "Lag from the engine's change to the router's index (1,000 single changes "
              "at 200/s, each published at once, with the index holding the blocks above), "
              "p50 / p99 µs:", ""]
    for total, r in results["sizes"].items():
        for label, n in (("before", r.get("nats_before")), ("after", r["nats"])):
            if n:
                lines.append(f"- {int(total):,} blocks, {label}: {n['lag_us']['p50']:,.0f} / "
                             f"{n['lag_us']['p99']:,.0f}")
    lines += ["", "A worker publishes what changed every 20 ms, which adds up to 20 ms from "
              "the engine's change to the publish.", ""]
    return "\n".join(lines)


async def amain(sizes: list[int], before: str) -> dict[str, Any]:
    results: dict[str, Any] = {"sizes": {}, "before_ref": before, "commit": head()}
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp) / "js")
        url = server.start()
        try:
            for total in sizes:
                r: dict[str, Any] = {}
                results["sizes"][str(total)] = r
                r["ours"] = in_process(total)
                r["dynamo"] = dynamo_peer(total)
                r["nats"] = await over_nats(total, url)
                if before:
                    r["nats_before"] = before_nats(total, before)
                r["raw_nats"] = await raw_nats(total, url)
                print(total, json.dumps(r), flush=True)
        finally:
            server.stop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--before", default="dfd89f6",
                    help="build to measure side by side over NATS ('' for none)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "router_index")
    ap.add_argument("--report-only", action="store_true", help="re-render the .md from .json")
    args = ap.parse_args()
    if args.report_only:
        results = json.loads(args.out.with_suffix(".json").read_text())
    else:
        results = asyncio.run(amain([int(s) for s in args.sizes.split(",")], args.before))
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    text = render(results)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
