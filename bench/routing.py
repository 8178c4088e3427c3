"""Routing quality on a Mooncake trace: our router's policy vs NVIDIA Dynamo's KV router,
both in offline (virtual-clock) simulation over the same simulated engines.

For each cluster shape (workers x KV blocks per worker, block size 16) it runs, in one
go: ``dynamo_bus.traces.simulate.simulate`` with ``kv_aware``, ``round_robin`` and ``random``;
Dynamo 1.6.1's own offline replay (``bench/peer_dynamo_replay.py`` in the Dynamo venv,
``bash bench/setup_dynamo_peer.sh``) with its ``kv_router`` (repeated: its ties are
broken at random) and ``round_robin``; and the infinite-cache bound of the trace. Both
simulators use Dynamo's mocker timing (vLLM-style scheduler, 8192-token chunked
prefill, prefill/decode polynomials); round robin, where routing cannot differ,
checks that the two engines simulate alike.

    python bench/routing.py                       # whole synthetic trace, 4x16384, 8x65536
    python bench/routing.py --limit 500 --shapes 4x16384

Writes bench/results/routing.md and routing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dynamo_bus.traces.mooncake import read_trace, reuse_bound  # noqa: E402
from dynamo_bus.traces.report import percentile  # noqa: E402
from dynamo_bus.traces.simulate import SimSettings, simulate  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "synthetic_trace.jsonl"
DYNAMO_PY = ROOT / ".peers" / "dynamo" / "bin" / "python"
OURS = ("kv_aware", "round_robin", "random")


def ours(trace: list, workers: int, blocks: int, strategy: str) -> dict:
    r = simulate(trace, SimSettings(workers=workers, num_blocks=blocks, strategy=strategy))
    ttft, e2e = r.ttft_ms, r.e2e_ms
    return {"reuse": r.reuse, "ttft_mean": statistics.fmean(ttft),
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "e2e_mean": statistics.fmean(e2e), "e2e_p50": percentile(e2e, 50),
            "e2e_p99": percentile(e2e, 99), "wall_s": r.wall_s, "completed": len(e2e)}


def dynamo(trace_path: Path, workers: int, blocks: int, mode: str, limit: int | None) -> dict:
    cmd = [str(DYNAMO_PY), str(ROOT / "bench" / "peer_dynamo_replay.py"), "--trace",
           str(trace_path), "--workers", str(workers), "--num-gpu-blocks", str(blocks),
           "--block-size", "16", "--router-mode", mode]
    if limit:
        cmd += ["--max-requests", str(limit)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "DYN_LOG": "error"}, timeout=600)
    s = json.loads(out.stdout)["summary"]
    return {"reuse": s["prefix_cache_reused_ratio"], "ttft_mean": s["mean_ttft_ms"],
            "ttft_p50": s["median_ttft_ms"], "ttft_p99": s["p99_ttft_ms"],
            "e2e_mean": s["mean_e2e_latency_ms"], "e2e_p50": s["median_e2e_latency_ms"],
            "e2e_p99": s["p99_e2e_latency_ms"], "wall_s": json.loads(out.stdout)["wall_s"],
            "completed": s.get("num_e2e_latency_samples")}


def median_run(runs: list[dict]) -> dict:
    """Per figure, the median of repeated runs, with the range of the hit rate."""
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "completed"}
    med["completed"] = runs[0]["completed"]
    med["reuse_range"] = [min(r["reuse"] for r in runs), max(r["reuse"] for r in runs)]
    med["runs"] = len(runs)
    return med


def row(name: str, r: dict) -> str:
    spread = ""
    if "reuse_range" in r:
        lo, hi = r["reuse_range"]
        spread = f" ({lo:.3f}-{hi:.3f}, {r['runs']} runs)"
    return (f"| {name} | {r['reuse']:.3f}{spread} | {r['ttft_mean']:,.0f} | "
            f"{r['ttft_p50']:,.1f} | {r['ttft_p99']:,.0f} | {r['e2e_mean']:,.0f} | "
            f"{r['e2e_p50']:,.0f} | {r['e2e_p99']:,.0f} | {r['wall_s']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--limit", type=int, default=None, help="first N requests only")
    ap.add_argument("--shapes", default="4x16384,8x65536", help="WORKERSxBLOCKS,...")
    ap.add_argument("--dynamo-repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "routing")
    args = ap.parse_args()
    if not DYNAMO_PY.exists():
        sys.exit("the Dynamo peer venv is missing: bash bench/setup_dynamo_peer.sh")
    trace = read_trace(args.trace, limit=args.limit)
    bound = reuse_bound(trace)
    results: dict = {"trace": str(args.trace), "requests": len(trace), "bound": bound,
                     "shapes": {}}
    for shape in args.shapes.split(","):
        workers, blocks = (int(x) for x in shape.split("x"))
        res: dict = {}
        for strategy in OURS:
            res[f"dynamo-bus {strategy}"] = ours(trace, workers, blocks, strategy)
            print(shape, strategy, res[f"dynamo-bus {strategy}"], flush=True)
        res["Dynamo kv_router"] = median_run(
            [dynamo(args.trace, workers, blocks, "kv_router", args.limit)
             for _ in range(args.dynamo_repeats)])
        res["Dynamo round_robin"] = dynamo(args.trace, workers, blocks, "round_robin",
                                           args.limit)
        print(shape, "dynamo", res["Dynamo kv_router"], flush=True)
        results["shapes"][shape] = res
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = [
        "# Routing quality: offline simulation, dynamo-bus vs NVIDIA Dynamo 1.6.1", "",
        f"Command: `python bench/routing.py{' --limit ' + str(args.limit) if args.limit else ''}"
        f" --shapes {args.shapes}` · {date.today()} · {platform.machine()}, "
        f"{os.cpu_count()} cores · wall time is each simulator's own run.", "",
        f"Trace: `{args.trace.name}`, {len(trace)} requests. Block size 16; Dynamo mocker "
        "timing and scheduler defaults on both sides (256 sequences, 8,192-token chunked "
        "prefill); arrivals on the trace's schedule. Prefix hit rate = cached prompt "
        f"tokens / prompt tokens. **Infinite-cache bound: {bound:.3f}.** TTFT and E2E in "
        "simulated ms from arrival.", ""]
    for shape, res in results["shapes"].items():
        w, b = shape.split("x")
        lines += [f"## {w} workers x {int(b):,} blocks", "",
                  "| router | prefix hit rate | TTFT mean | TTFT p50 | TTFT p99 | E2E mean | "
                  "E2E p50 | E2E p99 | wall s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [row(name, r) for name, r in res.items()]
        kv, dyn = res["dynamo-bus kv_aware"], res["Dynamo kv_router"]
        lines += ["", f"kv_aware ÷ Dynamo kv_router: hit rate {kv['reuse'] / dyn['reuse']:.2f}x, "
                  f"TTFT mean {kv['ttft_mean'] / dyn['ttft_mean']:.2f}x, "
                  f"p50 {kv['ttft_p50'] / dyn['ttft_p50']:.2f}x, "
                  f"p99 {kv['ttft_p99'] / dyn['ttft_p99']:.2f}x (below 1 is faster).", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"done in {time.time() - t0:.0f} s")
