"""The KV block manager's host tier (G2) and disk tier (G3), each figure against its
baseline in the same run:

* **onboarding bandwidth**: the reference engine (CPU) copying N host-tier blocks back
  into its pool (what a request whose prefix is in G2 waits for), against a plain
  tensor copy of the same bytes, for blocks whose slots and pool blocks run in order
  and for scattered ones; and N disk-tier blocks read, checked and copied into the
  pool, against a raw ``O_DIRECT`` read of the same file range;
* **TTFT of a repeated 4,096-token prompt** on the reference engine (CPU): computed
  from scratch, found in the pool (G1), found in the host tier (G2) after another
  prompt pushed it out of the pool, found on disk (G3) after two more pushed it out of
  a small host tier;
* **simulation** on the Mooncake synthetic trace (the router's kv_aware policy in front
  of simulated engines, Dynamo mocker timing): prefix hit rate and TTFT for the device
  pool only, with a host tier below it, and with a disk tier below that, beside the
  trace's infinite-cache bound;
* **the live stack**: ``dynamo-bus replay`` of the first part of the same trace against
  ``dynamo-bus serve --engine mock`` (4 workers), without and with the host tier.

    python bench/kvbm_tiers.py                  # all four
    python bench/kvbm_tiers.py --parts sim --limit 1000

Writes bench/results/kvbm_tiers.md and kvbm_tiers.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dynamo_bus.hashing import sequence_hashes  # noqa: E402
from dynamo_bus.traces.mooncake import read_trace, reuse_bound  # noqa: E402
from dynamo_bus.traces.report import percentile  # noqa: E402
from dynamo_bus.traces.simulate import SimSettings, simulate  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "synthetic_trace.jsonl"
BIN = Path(sys.executable).parent / "dynamo-bus"
BLOCK_BYTES = 23040 * 16  # the mock's KV bytes per 16-token block


# -- simulation -----------------------------------------------------------------------

def sim_part(args: argparse.Namespace) -> dict[str, Any]:
    trace = read_trace(TRACE, limit=args.limit)
    rows = {}
    host = args.host_factor * args.blocks
    disk = args.disk_factor * args.blocks
    tiers = f"+ host ({args.host_factor}x) + disk tier ({args.disk_factor}x)"
    for name, h, d, admit in (("device only", 0, 0, 2),
                              (f"+ host tier ({args.host_factor}x)", host, 0, 2),
                              (tiers, host, disk, 2),
                              (f"{tiers}, every block written", host, disk, 1)):
        r = simulate(trace, SimSettings(workers=args.workers, num_blocks=args.blocks,
                                        host_blocks=h, disk_blocks=d, disk_admit=admit))
        ttft = r.ttft_ms
        rows[name] = {"host_blocks": h, "disk_blocks": d, "disk_admit": admit, "reuse": r.reuse,
                      "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
                      "ttft_mean": statistics.fmean(ttft), "wall_s": r.wall_s}
        print(f"  sim {name}: hit {r.reuse:.3f} TTFT p50 {percentile(ttft, 50):.1f} "
              f"p99 {percentile(ttft, 99):.1f} ms ({r.wall_s:.0f} s)", flush=True)
    return {"requests": len(trace), "bound": reuse_bound(trace), "rows": rows}


# -- the live stack ---------------------------------------------------------------------

def live_part(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "bench"))
    import peer_dynamo as pd
    from aiperf_trace import stop_serve, wait_models

    run = ROOT / "bench" / ".runs" / f"kvbm-live-{time.strftime('%Y%m%d-%H%M%S')}"
    run.mkdir(parents=True)
    rows = {}
    host_blocks = args.host_factor * args.live_blocks
    for name, gib in (("device only", 0.0),
                      (f"+ host tier ({args.host_factor}x)", host_blocks * BLOCK_BYTES / 2**30)):
        port = pd.free_port()
        base = f"http://{pd.LOOPBACK}:{port}"
        tag = "host" if gib else "device"
        serve_argv = [str(BIN), "serve", "--engine", "mock", "--mock-speedup",
                      str(args.live_speedup), "--workers", str(args.live_workers),
                      "--num-blocks", str(args.live_blocks), "--kvbm-host-gib", f"{gib:.6f}",
                      "--max-concurrency", "256", "--context-length", "262144",
                      "--http-host", pd.LOOPBACK, "--http-port", str(port),
                      "--store-dir", str(run / f"nats-{tag}"), "--log-level", "warning"]
        replay_argv = [str(BIN), "replay", str(TRACE), "--url", f"{base}/v1", "--speedup",
                       str(args.live_speedup), "--timeout", "600", "--limit",
                       str(args.live_limit), "--out", str(run / tag)]
        serve = pd.spawn(f"serve-{tag}", serve_argv, run, env=dict(os.environ))
        try:
            wait_models(base, serve)
            subprocess.run(replay_argv, check=True, timeout=3600, stdout=subprocess.DEVNULL)
        finally:
            stop_serve(serve)
        summary = json.loads((run / f"{tag}.json").read_text())["summary"]
        rows[name] = {"host_gib": gib, "reuse": summary["prefix_hit_rate"],
                      "ttft_p50": summary["ttft_ms"]["p50"], "ttft_p99": summary["ttft_ms"]["p99"],
                      "completed": summary["completed"], "errors": summary["errors"],
                      "serve": " ".join(serve_argv[1:]), "replay": " ".join(replay_argv[1:])}
        print(f"  live {name}: hit {summary['prefix_hit_rate']:.3f}, errors "
              f"{summary['errors']}", flush=True)
    return {"rows": rows}


# -- reference engine -----------------------------------------------------------------

def _engine(blocks: int, host_gib: float, dtype: str, **kw: Any) -> Any:
    from dynamo_bus.engines.reference.engine import ReferenceEngine
    from dynamo_bus.models.modeldir import resolve_model

    return ReferenceEngine(resolve_model(None), dtype=dtype, device="cpu",
                           num_blocks=blocks, host_gib=host_gib,
                           max_num_batched_tokens=1024, **kw)


async def _ttft(eng: Any, rid: str, ids: list[int]) -> tuple[float, int]:
    from dynamo_bus.bus.messages import SamplingOptions
    from dynamo_bus.engines.base import EngineRequest

    t0 = time.perf_counter()
    cached = 0
    async for out in eng.generate(EngineRequest(rid, ids, SamplingOptions(
            max_tokens=1, temperature=0))):
        cached = max(cached, out.cached_tokens)
    return (time.perf_counter() - t0) * 1000, cached


def _prompt(seed: int, n: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


async def _alternate(repeats: int, ours: Any, theirs: Any) -> tuple[float, float]:
    """Median seconds of ``ours()`` and ``theirs()`` (coroutines), run alternately."""
    a, b = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        await ours()
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await theirs()
        b.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


async def _g2_onboard(eng: Any, args: argparse.Namespace) -> dict[str, Any]:
    """N host blocks into N pool blocks, and a plain copy of the same bytes: with slots
    and pool blocks in order (one copy), and scattered (one copy per block)."""
    import random

    import torch

    host = eng.host
    nblk = min(args.onboard_blocks, host.capacity, eng.num_blocks)
    hashes = list(range(1, nblk + 1))
    host.put(hashes, torch.randn((nblk, *host.data.shape[1:])).to(host.data.dtype))
    slots = host.pin(hashes)
    nbytes = nblk * host.block_bytes
    # Both written before the copy: a never-written source reads as the kernel's shared
    # zero page, from cache, and would flatter the baseline.
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    out: dict[str, Any] = {"blocks": nblk, "bytes": nbytes}
    rng = random.Random(3)
    for order, block_ids, rows in (
            ("in order", list(range(nblk)), slots),
            ("scattered", rng.sample(range(eng.num_blocks), nblk),
             rng.sample(slots, nblk))):
        ours, plain = await _alternate(
            args.repeats, lambda b=block_ids, r=rows: eng._onboard_blocks(b, r),
            lambda: asyncio.to_thread(dst.copy_, src))
        row = {"onboard_gib_s": nbytes / ours / 2**30, "copy_gib_s": nbytes / plain / 2**30}
        row["ratio"] = row["onboard_gib_s"] / row["copy_gib_s"]
        out[order] = row
        print(f"  G2 onboard {nblk} blocks {order}: {row['onboard_gib_s']:.2f} GiB/s, plain "
              f"copy {row['copy_gib_s']:.2f} ({row['ratio']:.2f}x)", flush=True)
    host.unpin(hashes)
    return out


async def _g3_onboard(eng: Any, args: argparse.Namespace) -> dict[str, Any]:
    """N disk blocks read, checked and copied into N pool blocks, against a raw
    O_DIRECT read of the same file ranges."""
    import mmap

    import torch

    disk = eng.disk
    files = disk.files
    nblk = min(args.onboard_blocks, disk.capacity - len(disk), eng.num_blocks)
    hashes = list(range(10**9, 10**9 + nblk))
    data = torch.randn((nblk, *eng.host.data.shape[1:])).to(eng.host.data.dtype)
    for i in range(0, nblk, files.write_rows):
        plan = disk.demote([(h, i + j) for j, h in enumerate(hashes[i:i + files.write_rows])])
        disk.stage(plan, data)
        disk.write_later(plan)
        await disk.flush()
    assert disk.prefix(hashes) == nblk, "the disk tier did not take every block"
    block_ids = list(range(nblk))
    ranges: list[tuple[Path, int, int]] = []  # (file, offset, bytes), coalesced
    for h in hashes:
        index, i = divmod(disk.slot(h), files.slots_per_file)
        path = next(files.directory.glob(f"kv-*-{index:04d}.blocks"))
        off = i * files.slot_bytes
        if ranges and ranges[-1][0] == path and ranges[-1][1] + ranges[-1][2] == off:
            ranges[-1] = (path, ranges[-1][1], ranges[-1][2] + files.slot_bytes)
        else:
            ranges.append((path, off, files.slot_bytes))
    buf = mmap.mmap(-1, max(n for _, _, n in ranges))  # page-aligned, as O_DIRECT needs

    def raw() -> None:
        for path, off, n in ranges:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                got = os.preadv(fd, [memoryview(buf)[:n]], off)
            finally:
                os.close(fd)
            assert got == n

    disk.pin(hashes)
    try:
        ours, theirs = await _alternate(
            args.repeats, lambda: eng._onboard_disk(block_ids, hashes),
            lambda: asyncio.to_thread(raw))
        assert await eng._onboard_disk(block_ids, hashes) == nblk
    finally:
        disk.unpin(hashes)
    nbytes = nblk * files.block_bytes
    row = {"blocks": nblk, "bytes": nbytes, "direct": files.direct,
           "onboard_gib_s": nbytes / ours / 2**30, "raw_gib_s": nbytes / theirs / 2**30}
    row["ratio"] = theirs / ours
    print(f"  G3 onboard {nblk} blocks: {row['onboard_gib_s']:.2f} GiB/s, raw read "
          f"{row['raw_gib_s']:.2f} ({row['ratio']:.2f}x)", flush=True)
    return row


async def engine_part(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    n = args.prompt_tokens
    blocks = n // 16 + 64  # room for one such prompt and a little more
    ids = _prompt(1, n)
    eng = _engine(blocks, host_gib=4.0, dtype=args.dtype)
    await eng.start()
    try:
        cold, _ = await _ttft(eng, "cold", ids)
        g1, g1_cached = await _ttft(eng, "g1", ids)
        await _ttft(eng, "other", _prompt(2, n))  # pushes the prompt out to the host tier
        in_pool = len(eng.pool.lookup(sequence_hashes(ids, 16)))
        g2, g2_cached = await _ttft(eng, "g2", ids)
        print(f"  TTFT {n} tokens: recompute {cold:.0f} ms, G1 {g1:.0f} ms, "
              f"G2 {g2:.0f} ms", flush=True)
        g2_onboard = await _g2_onboard(eng, args)
        dtype = eng.dtype_name
    finally:
        await eng.stop()

    # G3: a host tier of 64 blocks over a disk tier; three other prompts push the first
    # one out of the pool and then out of the host tier, down to disk.
    with tempfile.TemporaryDirectory(dir=args.disk_dir) as directory:
        block = _engine(1, 0.0, args.dtype).kv_bytes_per_token * 16
        eng = _engine(blocks, host_gib=64 * block / 2**30, dtype=args.dtype,
                      disk_gib=args.disk_gib, disk_dir=directory, disk_admit_after=1)
        await eng.start()
        try:
            await _ttft(eng, "cold", ids)
            for seed in (2, 3, 4):
                await _ttft(eng, f"other{seed}", _prompt(seed, n))
            await eng.disk.flush()
            hashes = sequence_hashes(ids, 16)[:(n - 1) // 16]
            g1_n = len(eng.pool.lookup(hashes))  # where the prefix is, as admission finds it
            g2_n = eng.host.prefix(hashes[g1_n:])
            where = {"g1": g1_n, "g2": g2_n, "g3": eng.disk.prefix(hashes[g1_n + g2_n:])}
            g3, g3_cached = await _ttft(eng, "g3", ids)
            print(f"  TTFT {n} tokens: G3 {g3:.0f} ms ({where})", flush=True)
            g3_onboard = await _g3_onboard(eng, args)
        finally:
            await eng.stop()
    ttft = {"recompute_ms": cold, "g1_hit_ms": g1, "g1_cached": g1_cached,
            "g2_hit_ms": g2, "g2_cached": g2_cached, "g1_blocks_left": in_pool,
            "g3_hit_ms": g3, "g3_cached": g3_cached, "g3_where": where}
    return {"dtype": dtype, "prompt_tokens": n, "ttft": ttft, "onboard": g2_onboard,
            "disk_onboard": g3_onboard}


# -- report ---------------------------------------------------------------------------

def write(out: Path, args: argparse.Namespace, res: dict[str, Any]) -> None:
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# KV block manager: the host tier (G2) and the disk tier (G3)", "",
             f"Command: `python bench/kvbm_tiers.py {' '.join(sys.argv[1:])}` · {when} · "
             f"git {commit} · {platform.machine()}, {len(os.sched_getaffinity(0))} "
             "cores, no GPU.", ""]
    if "engine" in res:
        e = res["engine"]
        t, o, d = e["ttft"], e["onboard"], e["disk_onboard"]
        w = t["g3_where"]
        lines += ["## Reference engine (CPU, " + e["dtype"] + ")", "",
                  f"TTFT of one repeated {e['prompt_tokens']:,}-token prompt (max_tokens 1):", "",
                  "| where the prefix was | TTFT ms | cached tokens |", "|---|---:|---:|",
                  f"| nowhere (recompute) | {t['recompute_ms']:,.0f} | 0 |",
                  f"| device pool (G1) | {t['g1_hit_ms']:,.0f} | {t['g1_cached']:,} |",
                  f"| host tier (G2), {t['g1_blocks_left']} of its blocks left in G1 | "
                  f"{t['g2_hit_ms']:,.0f} | {t['g2_cached']:,} |",
                  f"| disk tier (G3): {w['g3']} blocks on disk, {w['g2']} in G2, {w['g1']} in G1 "
                  f"| {t['g3_hit_ms']:,.0f} | {t['g3_cached']:,} |", "",
                  f"Onboarding {o['blocks']} blocks ({o['bytes'] / 2**20:.0f} MiB) from G2 into "
                  "the pool, against a plain tensor copy of the same bytes (medians of "
                  f"{args.repeats}, alternating):", "",
                  "| slots and pool blocks | onboard GiB/s | plain copy GiB/s | ratio |",
                  "|---|---:|---:|---:|"]
        for order in ("in order", "scattered"):
            r = o[order]
            lines.append(f"| {order} | {r['onboard_gib_s']:.2f} | {r['copy_gib_s']:.2f} | "
                         f"**{r['ratio']:.2f}x** |")
        lines += ["", f"Onboarding {d['blocks']} blocks ({d['bytes'] / 2**20:.0f} MiB) from G3 "
                  "(read through NIXL's POSIX backend, "
                  f"{'O_DIRECT' if d['direct'] else 'buffered'}, checksums checked, copied "
                  f"into the pool): **{d['onboard_gib_s']:.2f} GiB/s** against a raw "
                  f"`O_DIRECT` read of the same file ranges, {d['raw_gib_s']:.2f} GiB/s: "
                  f"**{d['ratio']:.2f}x** (medians of {args.repeats}, alternating).", ""]
    if "live" in res:
        lines += [f"## The live stack: `replay` of the first {args.live_limit} requests against "
                  f"`serve --engine mock`, {args.live_workers} workers x {args.live_blocks:,} "
                  f"blocks, arrivals and engines {args.live_speedup:g}x faster", ""]
        if "from" in res["live"]:
            lines += [f"(Not run this time: the figures of git {res['live']['from']}.)", ""]
        lines += [
                  "| tiers | completed / errors | prefix hit rate | TTFT p50 ms | TTFT p99 ms |",
                  "|---|---:|---:|---:|---:|"]
        for name, r in res["live"]["rows"].items():
            lines.append(f"| {name} | {r['completed']:,} / {r['errors']} | {r['reuse']:.3f} | "
                         f"{r['ttft_p50']:,.0f} | {r['ttft_p99']:,.0f} |")
        lines += [""] + [f"- `{r['serve']}` then `{r['replay']}`"
                         for r in res["live"]["rows"].values()] + [""]
    if "sim" in res:
        s = res["sim"]
        lines += [f"## Simulation: {s['requests']} requests of `synthetic_trace.jsonl`, "
                  f"{args.workers} workers x {args.blocks:,} device blocks", "",
                  *([f"(Not run this time: the figures of git {s['from']}.)", ""]
                    if "from" in s else []),
                  "kv_aware routing, Dynamo mocker timing, block size 16. Prefix hit rate = "
                  "cached prompt tokens / prompt tokens; TTFT in simulated ms from arrival.",
                  "Disk reads are charged at 1.1 GiB/s (O_DIRECT through NIXL, measured here); "
                  "the disk tier takes a block once two requests have asked for it (the "
                  "default), or every block the host tier evicts (`--kvbm-disk-admit 1`).",
                  "", "| tiers | host blocks / worker | disk blocks / worker | prefix hit rate "
                  "| TTFT p50 | TTFT p99 |", "|---|---:|---:|---:|---:|---:|"]
        for name, r in s["rows"].items():
            lines.append(f"| {name} | {r['host_blocks']:,} | {r.get('disk_blocks', 0):,} | "
                         f"{r['reuse']:.3f} | {r['ttft_p50']:,.1f} | {r['ttft_p99']:,.1f} |")
        lines.append(f"| infinite cache (bound) | — | — | {s['bound']:.3f} | — | — |")
        rows = list(s["rows"].values())
        gap = s["bound"] - rows[0]["reuse"]
        closed = [(r["reuse"] - rows[0]["reuse"]) / gap if gap > 0 else 0.0 for r in rows[1:]]
        lines += ["", f"Of the gap between the device pool alone and the bound, the host tier "
                  f"closes **{closed[0]:.0%}** (TTFT p99 {rows[1]['ttft_p99']:,.0f} against "
                  f"{rows[0]['ttft_p99']:,.0f} ms), host and disk **{closed[1]:.0%}** (TTFT "
                  f"p99 {rows[2]['ttft_p99']:,.0f} ms), **{closed[2]:.0%}** with every block "
                  f"written to disk (TTFT p99 {rows[3]['ttft_p99']:,.0f} ms).", ""]
        s["gap_closed"] = closed
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"commit": commit, "when": when,
                                                    **res}, indent=1))
    print(f"wrote {out.with_suffix('.md')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="engine,sim,live")
    ap.add_argument("--live-workers", type=int, default=4)
    ap.add_argument("--live-blocks", type=int, default=16384)
    ap.add_argument("--live-limit", type=int, default=1000)
    ap.add_argument("--live-speedup", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=16384)
    ap.add_argument("--host-factor", type=int, default=4)
    ap.add_argument("--disk-factor", type=int, default=16)
    ap.add_argument("--disk-gib", type=float, default=2.0,
                    help="the reference engine's disk tier for the G3 figures")
    ap.add_argument("--disk-dir", default=None,
                    help="where its block files go (default: the temp directory)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--onboard-blocks", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kvbm_tiers"))
    args = ap.parse_args()
    parts = args.parts.split(",")
    res: dict[str, Any] = {}
    old = Path(args.out).with_suffix(".json")
    if old.exists():  # parts not run this time keep their last figures, and their commit
        last = json.loads(old.read_text())
        for part in ("engine", "sim", "live"):
            if part not in parts and part in last:
                res[part] = {**last[part], "from": last[part].get("from", last["commit"])}
    if "engine" in parts:
        res["engine"] = asyncio.run(engine_part(args))
    if "sim" in parts:
        res["sim"] = sim_part(args)
    if "live" in parts:
        res["live"] = live_part(args)
    write(Path(args.out), args, res)


if __name__ == "__main__":
    main()
