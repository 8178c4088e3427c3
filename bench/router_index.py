"""The router's residency index: decision latency and update rate at 100k and 1M indexed
blocks, and the lag from a residency write to the router's index.

Part 1, in process, the workload of ``bench/peer_dynamo_index.py`` (8 workers, chains of
256 blocks, i.e. 4,096-token prompts at block size 16; queries share a random leading
part of a chain): our ``ResidencyIndex`` against NVIDIA Dynamo 1.6.1's Rust radix tree
(its Python binding, run in the Dynamo venv in the same invocation). Figures: build rate
(blocks/s), prefix-match latency, and our whole kv_aware decision (candidates, overlap,
cost, tie-break) with and without hashing the 4,096-token prompt.

Part 2, over a real nats-server on 127.0.0.1: a worker's ``ResidencyPublisher`` puts
blocks into the residency bucket while a router's ``ResidencyWatcher`` follows it; a
second watcher then rebuilds the index from the bucket (what a restarted router does).
Baseline: the same number of messages through raw nats-py core pub/sub. Lag: single
writes at a steady rate, publish to visible in the index.

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

from dynamo_bus.bus.connection import open_bus  # noqa: E402
from dynamo_bus.bus.messages import Fingerprint, Load, Registration, Request  # noqa: E402
from dynamo_bus.bus.natsserver import EmbeddedNats  # noqa: E402
from dynamo_bus.config import Config  # noqa: E402
from dynamo_bus.hashing import HASH_SCHEME, sequence_hashes  # noqa: E402
from dynamo_bus.routing.kv_index import ResidencyIndex  # noqa: E402
from dynamo_bus.routing.policy import RoutingPolicy  # noqa: E402
from dynamo_bus.routing.residency import ResidencyPublisher, ResidencyWatcher  # noqa: E402
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

    def residency_snapshot(self) -> dict[int, str]:
        return {}


async def over_nats(total: int, url: str) -> dict[str, Any]:
    cfg = Config(nats_url=url, namespace=f"b{total}")
    bus = await open_bus(cfg, url, name="bench-worker")
    router_bus = await open_bus(cfg, url, name="bench-router")
    source = FakeResidencySource()
    pub = ResidencyPublisher(bus, source, "w0", instance=1)
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
    assert await pub.flush(timeout=600), "the server did not store every put"
    published = time.perf_counter() - t
    while watcher.index.blocks_of("w0") < total:  # noqa: ASYNC110 (polls another task's work)
        await asyncio.sleep(0.01)
    followed = time.perf_counter() - t
    # a restarted router: rebuild from the bucket
    fresh_bus = await open_bus(cfg, url, name="bench-router-2")
    fresh = ResidencyWatcher(fresh_bus)
    t = time.perf_counter()
    await fresh.start(wait=600)
    rebuilt = time.perf_counter() - t
    assert fresh.index.blocks_of("w0") == total
    # lag: one write at a time, 200 a second, publish to visible
    seen: dict[int, float] = {}
    apply = watcher.index.apply

    def timed(worker_id: str, block_hash: int, tier: str | None, instance: int = 0) -> None:
        seen.setdefault(block_hash, time.perf_counter())
        apply(worker_id, block_hash, tier, instance)

    watcher.index.apply = timed  # type: ignore[method-assign]
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
    for b in (bus, router_bus, fresh_bus):
        await b.close()
    await watcher.stop()
    await fresh.stop()
    return {"publish_s": published, "publish_blocks_per_s": total / published,
            "follow_s": followed, "follow_blocks_per_s": total / followed,
            "rebuild_s": rebuilt, "rebuild_blocks_per_s": total / rebuilt,
            "resent": pub.resent,
            "lag_us": stats_us(lags), "lag_samples": len(lags)}


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
             f"Command: `python bench/router_index.py` · {date.today()} · "
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
    lines += ["", "## Over NATS: the residency bucket", "",
              "| blocks | publish blocks/s (worker) | followed by a router, blocks/s | "
              "rebuilt by a new router, blocks/s (s) | raw core NATS msgs/s (baseline) |",
              "|---|---|---|---|---|"]
    for total, r in results["sizes"].items():
        n, raw = r["nats"], r["raw_nats"]
        lines.append(f"| {int(total):,} | {n['publish_blocks_per_s']:,.0f} | "
                     f"{n['follow_blocks_per_s']:,.0f} | {n['rebuild_blocks_per_s']:,.0f} "
                     f"({n['rebuild_s']:.1f}) | {raw['msgs_per_s']:,.0f} |")
    lag = next(iter(results["sizes"].values()))["nats"]["lag_us"]
    lines += ["", f"Lag from a residency write to the router's index (1,000 single writes at "
              f"200/s, with the index holding the blocks above): p50 {lag['p50']:,.0f} µs, "
              f"p99 {lag['p99']:,.0f} µs. A worker batches its writes every 20 ms, which "
              "adds up to 20 ms from the engine's change to the write.", ""]
    return "\n".join(lines)


async def amain(sizes: list[int]) -> dict[str, Any]:
    results: dict[str, Any] = {"sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp) / "js")
        url = server.start()
        try:
            for total in sizes:
                r = results["sizes"][str(total)] = {}
                r["ours"] = in_process(total)
                r["dynamo"] = dynamo_peer(total)
                r["nats"] = await over_nats(total, url)
                r["raw_nats"] = await raw_nats(total, url)
                print(total, json.dumps(r), flush=True)
        finally:
            server.stop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "router_index")
    ap.add_argument("--report-only", action="store_true", help="re-render the .md from .json")
    args = ap.parse_args()
    if args.report_only:
        results = json.loads(args.out.with_suffix(".json").read_text())
    else:
        results = asyncio.run(amain([int(s) for s in args.sizes.split(",")]))
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    text = render(results)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
