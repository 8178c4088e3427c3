"""The KV block manager's host tier (G2), measured three ways, each against its baseline
in the same run:

* **onboarding bandwidth**: the reference engine (CPU) copying N host-tier blocks back
  into its pool (what a request whose prefix is in G2 waits for), against a plain
  tensor copy of the same bytes;
* **TTFT of a repeated 4,096-token prompt** on the reference engine (CPU): computed
  from scratch, found in the pool (G1), found in the host tier (G2) after other prompts
  pushed it out of the pool;
* **simulation** on the Mooncake synthetic trace (the router's kv_aware policy in front
  of simulated engines, Dynamo mocker timing): prefix hit rate and TTFT for the device
  pool only and with a host tier below it, beside the trace's infinite-cache bound;
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
    for name, host in (("device only", 0), (f"+ host tier ({args.host_factor}x)",
                                            args.host_factor * args.blocks)):
        r = simulate(trace, SimSettings(workers=args.workers, num_blocks=args.blocks,
                                        host_blocks=host))
        ttft = r.ttft_ms
        rows[name] = {"host_blocks": host, "reuse": r.reuse,
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

def _engine(blocks: int, host_gib: float, dtype: str) -> Any:
    from dynamo_bus.engines.reference.engine import ReferenceEngine
    from dynamo_bus.models.modeldir import resolve_model

    return ReferenceEngine(resolve_model(None), dtype=dtype, device="cpu",
                           num_blocks=blocks, host_gib=host_gib,
                           max_num_batched_tokens=1024)


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


async def engine_part(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    n = args.prompt_tokens
    blocks = n // 16 + 64  # room for one such prompt and a little more
    eng = _engine(blocks, host_gib=4.0, dtype=args.dtype)
    await eng.start()
    try:
        ids = _prompt(1, n)
        cold, _ = await _ttft(eng, "cold", ids)
        g1, g1_cached = await _ttft(eng, "g1", ids)
        await _ttft(eng, "other", _prompt(2, n))  # pushes the prompt out to the host tier
        in_pool = len(eng.pool.lookup(sequence_hashes(ids, 16)))
        g2, g2_cached = await _ttft(eng, "g2", ids)
        ttft = {"recompute_ms": cold, "g1_hit_ms": g1, "g1_cached": g1_cached,
                "g2_hit_ms": g2, "g2_cached": g2_cached, "g1_blocks_left": in_pool}
        print(f"  TTFT {n} tokens: recompute {cold:.0f} ms, G1 {g1:.0f} ms, "
              f"G2 {g2:.0f} ms", flush=True)

        # Onboarding bandwidth: N host blocks into N pool blocks, and a plain copy of
        # the same bytes, alternating, medians.
        host = eng.host
        assert host is not None
        nblk = min(args.onboard_blocks, host.capacity, eng.num_blocks)
        hashes = list(range(1, nblk + 1))
        host.put(hashes, torch.randn((nblk, *host.data.shape[1:])).to(host.data.dtype))
        slots = host.pin(hashes)
        block_ids = list(range(nblk))
        nbytes = nblk * host.block_bytes
        src = torch.empty(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        ours, plain = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            await eng._onboard_blocks(block_ids, slots)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await asyncio.to_thread(dst.copy_, src)
            plain.append(time.perf_counter() - t0)
        host.unpin(hashes)
        onboard = {"blocks": nblk, "bytes": nbytes,
                   "onboard_gib_s": nbytes / statistics.median(ours) / 2**30,
                   "copy_gib_s": nbytes / statistics.median(plain) / 2**30}
        onboard["ratio"] = onboard["onboard_gib_s"] / onboard["copy_gib_s"]
        print(f"  onboard {nblk} blocks ({nbytes / 2**20:.0f} MiB): "
              f"{onboard['onboard_gib_s']:.2f} GiB/s against a plain copy's "
              f"{onboard['copy_gib_s']:.2f} ({onboard['ratio']:.2f}x)", flush=True)
        return {"dtype": eng.dtype_name, "prompt_tokens": n, "ttft": ttft, "onboard": onboard}
    finally:
        await eng.stop()


# -- report ---------------------------------------------------------------------------

def write(out: Path, args: argparse.Namespace, res: dict[str, Any]) -> None:
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# KV block manager: the host tier (G2)", "",
             f"Command: `python bench/kvbm_tiers.py {' '.join(sys.argv[1:])}` · {when} · "
             f"git {commit} · {platform.machine()}, {len(os.sched_getaffinity(0))} "
             "cores, no GPU.", ""]
    if "engine" in res:
        e = res["engine"]
        t, o = e["ttft"], e["onboard"]
        lines += ["## Reference engine (CPU, " + e["dtype"] + ")", "",
                  f"TTFT of one repeated {e['prompt_tokens']:,}-token prompt (max_tokens 1):", "",
                  "| where the prefix was | TTFT ms | cached tokens |", "|---|---:|---:|",
                  f"| nowhere (recompute) | {t['recompute_ms']:,.0f} | 0 |",
                  f"| device pool (G1) | {t['g1_hit_ms']:,.0f} | {t['g1_cached']:,} |",
                  f"| host tier (G2), {t['g1_blocks_left']} of its blocks left in G1 | "
                  f"{t['g2_hit_ms']:,.0f} | {t['g2_cached']:,} |", "",
                  f"Onboarding {o['blocks']} blocks ({o['bytes'] / 2**20:.0f} MiB) from G2 into "
                  f"the pool: **{o['onboard_gib_s']:.2f} GiB/s** against a plain tensor copy "
                  f"of the same bytes, {o['copy_gib_s']:.2f} GiB/s: **{o['ratio']:.2f}x** "
                  f"(medians of {args.repeats}, alternating).", ""]
    if "live" in res:
        lines += [f"## The live stack: `replay` of the first {args.live_limit} requests against "
                  f"`serve --engine mock`, {args.live_workers} workers x {args.live_blocks:,} "
                  f"blocks, arrivals and engines {args.live_speedup:g}x faster", "",
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
                  "kv_aware routing, Dynamo mocker timing, block size 16. Prefix hit rate = "
                  "cached prompt tokens / prompt tokens; TTFT in simulated ms from arrival.",
                  "", "| tiers | host blocks / worker | prefix hit rate | TTFT p50 | TTFT p99 |",
                  "|---|---:|---:|---:|---:|"]
        for name, r in s["rows"].items():
            lines.append(f"| {name} | {r['host_blocks']:,} | {r['reuse']:.3f} | "
                         f"{r['ttft_p50']:,.1f} | {r['ttft_p99']:,.1f} |")
        lines.append(f"| infinite cache (bound) | — | {s['bound']:.3f} | — | — |")
        rows = list(s["rows"].values())
        gap = s["bound"] - rows[0]["reuse"]
        closed = (rows[1]["reuse"] - rows[0]["reuse"]) / gap if gap > 0 else 0.0
        lines += ["", f"The host tier closes **{closed:.0%}** of the gap between the device "
                  f"pool alone and the bound; TTFT p99 {rows[1]['ttft_p99']:,.0f} against "
                  f"{rows[0]['ttft_p99']:,.0f} ms.", ""]
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
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--onboard-blocks", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kvbm_tiers"))
    args = ap.parse_args()
    parts = args.parts.split(",")
    res: dict[str, Any] = {}
    if "engine" in parts:
        res["engine"] = asyncio.run(engine_part(args))
    if "sim" in parts:
        res["sim"] = sim_part(args)
    if "live" in parts:
        res["live"] = live_part(args)
    write(Path(args.out), args, res)


if __name__ == "__main__":
    main()
